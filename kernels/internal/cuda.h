// Do not include directly: internal to //kernels.
// IWYU pragma: private, include "kernels/launch.h"
//
// The one seam between kvx's host code and the CUDA runtime. Every CUDA call of
// //kernels goes through these functions; internal/cuda_runtime.cc implements
// them with the toolkit and internal/no_cuda.cc, in builds without it, returns
// Unimplemented from each. No CUDA type appears here: streams and events travel
// as void*.

#ifndef KVX_KERNELS_INTERNAL_CUDA_H_
#define KVX_KERNELS_INTERNAL_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/internal/copy_kernels.h"
#include "kernels/launch.h"

namespace kvx::kernels_internal {

// The checks every kernel call makes on its launch before touching memory, for
// `op` ("gather", "split heads") carrying `entries` list entries (fragments, or
// blocks + parts): kHost passes; kCuda needs the toolkit (Unimplemented), a
// workspace (InvalidArgument) and entries <= its capacity (ResourceExhausted).
// Defined in launch.cc.
absl::Status CheckLaunch(const kernels::Launch& launch, absl::string_view op,
                         uint64_t entries);

class Cuda {
 public:
  // True in builds with the toolkit.
  static bool Built();

  // Allocates `workspace`'s pinned and device entry arrays (capacity + 1 entries)
  // and its event; on error leaves nothing allocated.
  static absl::Status InitWorkspace(int64_t capacity, kernels::DeviceWorkspace* workspace);
  // Waits for the workspace's last launch and frees what InitWorkspace took.
  static void ReleaseWorkspace(kernels::DeviceWorkspace* workspace);

  // Waits until the workspace's previous launch has finished reading its
  // entries, then returns the pinned array to fill (capacity + 1 entries).
  static absl::StatusOr<absl::Span<CopyEntry>> AcquireEntries(
      kernels::DeviceWorkspace* workspace);
  // Uploads the acquired entries (fragments + 1 for a copy, blocks + parts for
  // heads) on the launch's stream, queues the kernel, and marks the workspace
  // busy until both are done.
  static absl::Status LaunchCopy(const kernels::Launch& launch, uint64_t fragments,
                                 CopyDirection direction, void* staging,
                                 uint64_t total_bytes);
  static absl::Status LaunchHeads(const kernels::Launch& launch, const HeadCopy& copy);

  static absl::Status Synchronize(kernels::CudaStream stream);

  static absl::StatusOr<int> DeviceCount();
  static absl::StatusOr<void*> Malloc(uint64_t bytes);
  static void Free(void* device);
  // Page-locked host memory, mapped into the device's address space (unified
  // addressing: the same pointer works in kernels), for staging.
  static absl::StatusOr<void*> MallocPinned(uint64_t bytes);
  static void FreePinned(void* host);
  // Synchronous cudaMemcpy, cudaMemcpyDefault.
  static absl::Status Copy(void* dst, const void* src, uint64_t bytes);
  static absl::Status CopyAsync(kernels::CudaStream stream, void* dst, const void* src,
                                uint64_t bytes);

  // Events with timing, for DeviceTimer.
  static absl::StatusOr<void*> CreateTimingEvent();
  static void DestroyEvent(void* event);
  static absl::Status RecordEvent(void* event, kernels::CudaStream stream);
  static absl::StatusOr<double> ElapsedSeconds(void* start, void* stop);
};

}  // namespace kvx::kernels_internal

#endif  // KVX_KERNELS_INTERNAL_CUDA_H_
