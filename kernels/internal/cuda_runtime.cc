// internal/cuda.h with the CUDA runtime (builds with the toolkit).

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

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

// The code says what the caller can do next: no driver or device is
// Unavailable, no memory ResourceExhausted, a rejected argument
// InvalidArgument; anything else (a fault inside a kernel) is Internal.
absl::Status CudaStatus(cudaError_t error, absl::string_view call) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat("cuda call failed: call=", call, " error=", cudaGetErrorName(error),
                   " code=", static_cast<int>(error), " text=", cudaGetErrorString(error));
  switch (error) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInitializationError:
      return absl::UnavailableError(message);
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

cudaStream_t Native(kernels::CudaStream stream) {
  return static_cast<cudaStream_t>(stream.native());
}

uint64_t EntryBytes(uint64_t entries) { return entries * sizeof(CopyEntry); }

}  // namespace

bool Cuda::Built() { return true; }

absl::Status Cuda::InitWorkspace(int64_t capacity, kernels::DeviceWorkspace* workspace) {
  const uint64_t bytes = EntryBytes(static_cast<uint64_t>(capacity) + 1);
  absl::Status status = CudaStatus(cudaMallocHost(&workspace->host_entries_, bytes),
                                   "cudaMallocHost");
  if (status.ok()) {
    status = CudaStatus(cudaMalloc(&workspace->device_entries_, bytes), "cudaMalloc");
  }
  if (status.ok()) {
    cudaEvent_t event = nullptr;
    status = CudaStatus(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                        "cudaEventCreateWithFlags");
    workspace->last_launch_ = event;
  }
  if (!status.ok()) {
    ReleaseWorkspace(workspace);
    return status;
  }
  workspace->capacity_ = capacity;
  return absl::OkStatus();
}

void Cuda::ReleaseWorkspace(kernels::DeviceWorkspace* workspace) {
  if (workspace->last_launch_ != nullptr) {
    // The destructor cannot report; a failed launch's error stays on its stream.
    (void)cudaEventSynchronize(static_cast<cudaEvent_t>(workspace->last_launch_));
    (void)cudaEventDestroy(static_cast<cudaEvent_t>(workspace->last_launch_));
  }
  if (workspace->device_entries_ != nullptr) (void)cudaFree(workspace->device_entries_);
  if (workspace->host_entries_ != nullptr) (void)cudaFreeHost(workspace->host_entries_);
  workspace->last_launch_ = nullptr;
  workspace->device_entries_ = nullptr;
  workspace->host_entries_ = nullptr;
  workspace->capacity_ = 0;
}

absl::StatusOr<absl::Span<CopyEntry>> Cuda::AcquireEntries(
    kernels::DeviceWorkspace* workspace) {
  // The previous launch's upload may still be reading the pinned array and its
  // kernel the device array; both are before the event on their stream.
  absl::Status status = CudaStatus(
      cudaEventSynchronize(static_cast<cudaEvent_t>(workspace->last_launch_)),
      "cudaEventSynchronize");
  if (!status.ok()) return status;
  return absl::MakeSpan(static_cast<CopyEntry*>(workspace->host_entries_),
                        static_cast<size_t>(workspace->capacity_) + 1);
}

namespace {

// What a launch needs of its workspace (Cuda is the workspace's friend).
struct WorkspaceArrays {
  void* host_entries;
  void* device_entries;
  cudaEvent_t last_launch;
};

// Uploads `entries` entries, runs `launch_kernel` and records the workspace's
// event after them even when the kernel launch failed: the upload is queued and
// the pinned array must not be rewritten before it has run.
template <typename LaunchKernel>
absl::Status UploadAndLaunch(const WorkspaceArrays& workspace, cudaStream_t stream,
                             uint64_t entries, LaunchKernel launch_kernel) {
  absl::Status status = CudaStatus(
      cudaMemcpyAsync(workspace.device_entries, workspace.host_entries, EntryBytes(entries),
                      cudaMemcpyHostToDevice, stream),
      "cudaMemcpyAsync");
  if (!status.ok()) return status;
  status = CudaStatus(static_cast<cudaError_t>(launch_kernel(
                          static_cast<const CopyEntry*>(workspace.device_entries), stream)),
                      "kernel launch");
  status.Update(CudaStatus(cudaEventRecord(workspace.last_launch, stream), "cudaEventRecord"));
  return status;
}

}  // namespace

absl::Status Cuda::LaunchCopy(const kernels::Launch& launch, uint64_t fragments,
                              CopyDirection direction, void* staging, uint64_t total_bytes) {
  const kernels::DeviceWorkspace& w = *launch.workspace;
  const WorkspaceArrays arrays{w.host_entries_, w.device_entries_,
                               static_cast<cudaEvent_t>(w.last_launch_)};
  return UploadAndLaunch(arrays, Native(launch.stream), fragments + 1,
                         [&](const CopyEntry* entries, cudaStream_t stream) {
                           return LaunchCopyKernel(entries, fragments, direction, staging,
                                                   total_bytes, stream);
                         });
}

absl::Status Cuda::LaunchHeads(const kernels::Launch& launch, const HeadCopy& copy) {
  const kernels::DeviceWorkspace& w = *launch.workspace;
  const WorkspaceArrays arrays{w.host_entries_, w.device_entries_,
                               static_cast<cudaEvent_t>(w.last_launch_)};
  return UploadAndLaunch(arrays, Native(launch.stream), copy.blocks + copy.parts,
                         [&](const CopyEntry* entries, cudaStream_t stream) {
                           return LaunchHeadKernel(entries, copy, stream);
                         });
}

absl::Status Cuda::Synchronize(kernels::CudaStream stream) {
  return CudaStatus(cudaStreamSynchronize(Native(stream)), "cudaStreamSynchronize");
}

absl::StatusOr<int> Cuda::DeviceCount() {
  int count = 0;
  absl::Status status = CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (!status.ok()) return status;
  return count;
}

absl::StatusOr<void*> Cuda::Malloc(uint64_t bytes) {
  void* device = nullptr;
  absl::Status status = CudaStatus(cudaMalloc(&device, bytes), "cudaMalloc");
  if (!status.ok()) return status;
  return device;
}

void Cuda::Free(void* device) { (void)cudaFree(device); }

absl::StatusOr<void*> Cuda::MallocPinned(uint64_t bytes) {
  void* host = nullptr;
  absl::Status status = CudaStatus(
      cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
  if (!status.ok()) return status;
  return host;
}

void Cuda::FreePinned(void* host) { (void)cudaFreeHost(host); }

absl::Status Cuda::Copy(void* dst, const void* src, uint64_t bytes) {
  return CudaStatus(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy");
}

absl::Status Cuda::CopyAsync(kernels::CudaStream stream, void* dst, const void* src,
                             uint64_t bytes) {
  return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, Native(stream)),
                    "cudaMemcpyAsync");
}

absl::StatusOr<void*> Cuda::CreateTimingEvent() {
  cudaEvent_t event = nullptr;
  absl::Status status = CudaStatus(cudaEventCreate(&event), "cudaEventCreate");
  if (!status.ok()) return status;
  return static_cast<void*>(event);
}

void Cuda::DestroyEvent(void* event) { (void)cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

absl::Status Cuda::RecordEvent(void* event, kernels::CudaStream stream) {
  return CudaStatus(cudaEventRecord(static_cast<cudaEvent_t>(event), Native(stream)),
                    "cudaEventRecord");
}

absl::StatusOr<double> Cuda::ElapsedSeconds(void* start, void* stop) {
  absl::Status status =
      CudaStatus(cudaEventSynchronize(static_cast<cudaEvent_t>(stop)), "cudaEventSynchronize");
  if (!status.ok()) return status;
  float ms = 0;
  status = CudaStatus(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start),
                                           static_cast<cudaEvent_t>(stop)),
                      "cudaEventElapsedTime");
  if (!status.ok()) return status;
  return ms / 1e3;
}

}  // namespace kvx::kernels_internal
