"""torch.compile's caches are keyed by dycon_kernels' sources (dycon_kernels/_compile_cache.py)."""
import shutil

import torch

import dycon_kernels
from dycon_kernels import _compile_cache
from dycon_kernels._compile_cache import source_digest, tag_compile_caches


def copy_of_package(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(_compile_cache._PACKAGE, root, ignore=shutil.ignore_patterns("*.so", "*.json", "__pycache__"))
    return root


def test_digest_follows_every_source_file(tmp_path):
    root = copy_of_package(tmp_path)
    first = source_digest(root)
    assert source_digest(root) == first == source_digest(_compile_cache._PACKAGE)
    fecl = root / "fecl.py"
    fecl.write_text(fecl.read_text() + "\n# changed\n")
    changed = source_digest(root)
    assert changed != first
    (root / "triton" / "new_module.py").write_text("x = 1\n")
    assert source_digest(root) not in (first, changed)


def test_import_tags_the_compile_caches():
    assert dycon_kernels  # imported above: the tag is set at import
    assert f"dycon_kernels-src-{source_digest()}" in torch.compiler.config.cache_key_tag


def test_a_user_tag_is_kept_and_ours_added_once():
    with torch.compiler.config.patch(cache_key_tag="mine"):
        tag_compile_caches()
        tag_compile_caches()
        assert torch.compiler.config.cache_key_tag == f"mine+dycon_kernels-src-{source_digest()}"
