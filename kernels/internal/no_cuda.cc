// internal/cuda.h in builds without the CUDA toolkit: every operation returns
// Unimplemented, so kCuda launches, device buffers and timers fail with a reason
// instead of a link error, and the host reference works as usual.

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/internal/copy_kernels.h"
#include "kernels/internal/cuda.h"
#include "kernels/launch.h"

namespace kvx::kernels_internal {
namespace {

absl::Status NotBuilt(absl::string_view op) {
  return absl::UnimplementedError(
      absl::StrCat("kvx was built without the CUDA toolkit (no nvcc at $CUDA_PATH or "
                   "/usr/local/cuda when Bazel configured @local_cuda; see "
                   "kernels/README.md): op=",
                   op));
}

}  // namespace

bool Cuda::Built() { return false; }

absl::Status Cuda::InitWorkspace(int64_t, kernels::DeviceWorkspace*) {
  return NotBuilt("create_workspace");
}

void Cuda::ReleaseWorkspace(kernels::DeviceWorkspace*) {}

absl::StatusOr<absl::Span<CopyEntry>> Cuda::AcquireEntries(kernels::DeviceWorkspace*) {
  return NotBuilt("acquire_entries");
}

absl::Status Cuda::LaunchCopy(const kernels::Launch&, uint64_t, CopyDirection, void*,
                              uint64_t) {
  return NotBuilt("gather_or_scatter");
}

absl::Status Cuda::LaunchHeads(const kernels::Launch&, const HeadCopy&) {
  return NotBuilt("heads");
}

absl::Status Cuda::Synchronize(kernels::CudaStream) { return NotBuilt("synchronize"); }

absl::StatusOr<int> Cuda::DeviceCount() { return NotBuilt("device_count"); }

absl::StatusOr<void*> Cuda::Malloc(uint64_t) { return NotBuilt("malloc"); }

void Cuda::Free(void*) {}

absl::StatusOr<void*> Cuda::MallocPinned(uint64_t) { return NotBuilt("malloc_pinned"); }

void Cuda::FreePinned(void*) {}

absl::Status Cuda::Copy(void*, const void*, uint64_t) { return NotBuilt("memcpy"); }

absl::Status Cuda::CopyAsync(kernels::CudaStream, void*, const void*, uint64_t) {
  return NotBuilt("memcpy_async");
}

absl::StatusOr<void*> Cuda::CreateTimingEvent() { return NotBuilt("create_event"); }

void Cuda::DestroyEvent(void*) {}

absl::Status Cuda::RecordEvent(void*, kernels::CudaStream) { return NotBuilt("record_event"); }

absl::StatusOr<double> Cuda::ElapsedSeconds(void*, void*) { return NotBuilt("elapsed"); }

}  // namespace kvx::kernels_internal
