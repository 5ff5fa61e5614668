"""Unlabelled images for nnU-Net: found in ``imagesUnlabelled/``, preprocessed by nnU-Net itself.

nnU-Net has no notion of an image without a label. The raw dataset folder gets one more
folder, ``imagesUnlabelled/``, named and split into channels as ``imagesTr/``
(``<case>_<XXXX><file_ending>``, one file per channel of dataset.json). The trainer
preprocesses those cases with the configuration's own preprocessor and plans (no label) into
``<nnUNet_preprocessed>/<dataset>/<data_identifier>_unlabelled/``, beside the labelled cases,
and redoes it when the plans or the files change (``manifest.json`` there records both).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from os.path import join

UNLABELLED_FOLDER = "imagesUnlabelled"
MANIFEST = "manifest.json"


def unlabelled_cases(raw_dataset_folder: str, dataset_json: dict) -> dict[str, list[str]]:
    """``{case: [channel files in channel order]}`` of ``imagesUnlabelled/``; ``{}`` when the
    folder is absent. A file that is not ``<case>_<XXXX><file_ending>``, or a case whose channels
    are not exactly those of dataset.json, is an error naming it."""
    folder = join(raw_dataset_folder, UNLABELLED_FOLDER)
    if not os.path.isdir(folder):
        return {}
    ending = dataset_json["file_ending"]
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    found: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.fullmatch(name)
        if match is None:
            raise ValueError(f"{join(folder, name)}: not named <case>_<XXXX>{ending} as the files of imagesTr")
        case, channel = match.group(1), int(match.group(2))
        if channel >= channels:
            raise ValueError(f"{join(folder, name)}: channel {channel:04d}, but dataset.json has {channels} "
                             f"channel(s) (0000-{channels - 1:04d})")
        found.setdefault(case, {})[channel] = join(folder, name)
    for case, files in found.items():
        missing = [f"{case}_{c:04d}{ending}" for c in range(channels) if c not in files]
        if missing:
            raise ValueError(f"{folder}: case {case!r} lacks channel file(s) {missing}")
    return {case: [files[c] for c in range(channels)] for case, files in found.items()}


def preprocessed_folder(preprocessed_dataset_folder: str) -> str:
    """Where a configuration's unlabelled cases go: beside its labelled ones (which
    nnUNetv2_preprocess deletes and rewrites, hence a folder of their own)."""
    return preprocessed_dataset_folder.rstrip(os.sep) + "_unlabelled"


def _manifest(cases: dict, plans_manager, configuration_manager) -> dict:
    files = {case: [[f, os.path.getmtime(f), os.path.getsize(f)] for f in paths] for case, paths in cases.items()}
    return {"plans_name": plans_manager.plans_name, "configuration": configuration_manager.configuration,
            "files": files}


def preprocess_unlabelled(cases: dict, out_folder: str, plans_manager, configuration_manager,
                          dataset_json: dict, log=print) -> None:
    """Preprocess ``cases`` into ``out_folder`` with the configuration's preprocessor, unless the
    folder already holds them for these plans and files."""
    manifest = json.loads(json.dumps(_manifest(cases, plans_manager, configuration_manager)))
    manifest_file = join(out_folder, MANIFEST)
    if os.path.isfile(manifest_file):
        with open(manifest_file) as f:
            if json.load(f) == manifest:
                return
    shutil.rmtree(out_folder, ignore_errors=True)
    os.makedirs(out_folder)
    log(f"DyCON: preprocessing {len(cases)} unlabelled case(s) into {out_folder}")
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    run_case = preprocessor.run_case

    def run_case_without_label(*args, **kwargs):
        # nnU-Net's loader reads class_locations for every case; an unlabelled case has none,
        # and is only ever cropped at random
        data, seg, properties = run_case(*args, **kwargs)
        properties["class_locations"] = {}
        return data, seg, properties

    preprocessor.run_case = run_case_without_label   # run_case_save (nnU-Net's writer) calls it
    for case, files in cases.items():
        preprocessor.run_case_save(join(out_folder, case), files, None, plans_manager, configuration_manager,
                                   dataset_json)
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
