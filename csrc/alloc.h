// Output allocation for every kernel entry point.
//
// Outputs are allocated uninitialised; with DYCON_POISON=1 in the environment (the test suite
// sets it) they are filled with NaN first, so an element a kernel forgets to write fails the
// comparison against the reference instead of passing by luck.
//
// CPU outputs of 2 MiB or more (UnCL's logit gradients, FeCL's dz) are 2 MiB-aligned and marked
// MADV_HUGEPAGE, as torch's own allocator does under THP_MEM_ALLOC_ENABLE=1. Why: glibc hands
// large freed blocks back to the OS, so such an output is often fresh memory, and the first
// touch of each 4 KiB page is a page fault. On the development VM (KVM, AMD EPYC) writing 14 MB
// of fresh memory (UnCL's 2x2x96^3 gradient; the fused kernel takes ~6-7 ms) and unmapping it
// took 5.9 ms at 1 thread and 3.4 ms at 2 in 4 KiB pages, 0.8 and 0.4 ms in 2 MiB pages
// (docs/engineering.md, "CPU kernels and the vector ISA").
//
// Freed blocks are kept for the next output of the same size (a training step allocates the same
// gradients every step), a few and a bounded number of bytes, as torch's CUDA allocator caches its
// blocks. Why: glibc unmapped UnCL's 14 MB gradient at every free, and even a fresh huge page is
// zeroed by the OS at its first touch, by whichever thread touches it first (with 64 KiB blocks
// taken in turn, both threads write every page: 15-16 faults per call at 2 threads, 9 at 1). In
// one process, UnCL's kernel at 2x2x96^3 took 7.3-7.6 ms at 1 thread with fresh pages or the block
// reused, and at 2 threads 4.2-4.5 ms fresh, 3.8-4.0 ms reused: the fresh pages were the part of
// the call that did not halve (docs/engineering.md, "Threads").
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <limits>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace dycon {

inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("DYCON_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

constexpr size_t kHugePageBytes = size_t(2) << 20;

// The freed blocks kept for reuse: at most kMaxBlocks and kMaxBytes in all (the oldest is freed
// first), each taken again by an output of exactly its size, the most recently freed first (the
// likeliest to be still in the caches).
class FreeBlockCache {
 public:
  static constexpr size_t kMaxBlocks = 4, kMaxBytes = size_t(256) << 20;

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it)
      if (it->bytes == bytes) {
        void* p = it->data;
        total_ -= bytes;
        blocks_.erase(std::next(it).base());
        return p;
      }
    return nullptr;
  }
  // Keeps the block, or frees it when it alone is over the byte bound.
  void put(void* data, size_t bytes) {
    if (bytes > kMaxBytes) return std::free(data);
    std::lock_guard<std::mutex> lock(mutex_);
    blocks_.push_back({data, bytes});
    total_ += bytes;
    while (blocks_.size() > kMaxBlocks || total_ > kMaxBytes) {
      std::free(blocks_.front().data);
      total_ -= blocks_.front().bytes;
      blocks_.pop_front();
    }
  }

 private:
  struct Entry {
    void* data;
    size_t bytes;
  };
  std::mutex mutex_;
  std::deque<Entry> blocks_;
  size_t total_ = 0;
};

// posix_memalign at 2 MiB and the MADV_HUGEPAGE hint (ignored where THP is off); freed blocks go
// to the FreeBlockCache. Allocations and frees are reported to torch's profiler, as its own CPU
// allocator does (a cached block counts as freed).
class HugePageCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    // Whole 2 MiB pages: a 4 KiB tail would fault page by page (UnCL's 14 MB: 392 faults, 0.6 ms).
    const size_t padded = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* p = cache().take(padded);
    if (p == nullptr) p = fresh(nbytes, padded);
    report(p, int64_t(padded));
    return {p, new Block{p, padded}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };
  static void* fresh(size_t nbytes, size_t padded) {
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHugePageBytes, padded) == 0, "dycon: not enough memory for a ", nbytes,
                "-byte CPU output");
#ifdef __linux__
    madvise(p, padded, MADV_HUGEPAGE);  // a hint: failure only means 4 KiB pages
#endif
    return p;
  }
  // Never destroyed: outputs may be freed after static destructors have run (at exit).
  static FreeBlockCache& cache() {
    static auto* c = new FreeBlockCache;
    return *c;
  }
  static std::atomic<int64_t>& allocated() {
    static std::atomic<int64_t> total{0};
    return total;
  }
  static void report(void* p, int64_t delta) {
    const int64_t total = allocated() += delta;
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(p, delta, size_t(total), size_t(total), c10::Device(c10::DeviceType::CPU));
  }
  static void release(void* ctx) {
    if (ctx == nullptr) return;
    const Block* b = static_cast<const Block*>(ctx);
    report(b->data, -int64_t(b->bytes));
    cache().put(b->data, b->bytes);
    delete b;
  }
};

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && options.layout() == at::kStrided && nbytes >= kHugePageBytes) {
    static HugePageCpuAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), c10::nullopt);
  }
  return at::empty(sizes, options);
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = empty_output(sizes, options);
  if (poison_outputs() && out.numel() > 0) {
    if (at::isFloatingType(out.scalar_type())) out.fill_(std::numeric_limits<double>::quiet_NaN());
    else out.fill_(-12345);  // integer outputs (indices): a value no kernel writes
  }
  return out;
}

}  // namespace dycon
