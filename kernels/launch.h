// File: kernels/launch.h
//
// Where a kvx kernel runs. Every kernel entry point (kernels/staging.h,
// kernels/heads.h) takes a Launch first and has one signature for both backends:
//
//   kHost  the host reference: plain memcpy on the calling thread, synchronous.
//          Buffers are host memory. Always built; tests on machines without a GPU
//          and the transfer path with host-memory pools use it.
//   kCuda  one CUDA kernel launch on `stream`, asynchronous: the call returns once
//          the work is queued; Wait(launch) (or the engine's own stream sync)
//          makes it complete. Buffers are device-accessible memory (device,
//          pinned host or managed). The call's pointer list is uploaded through
//          a caller-owned DeviceWorkspace, so the hot path allocates nothing.
//
// No CUDA type appears here: a cudaStream_t travels as a CudaStream (its value as
// a void*). When kvx is built without the CUDA toolkit (third_party/
// cuda_configure.bzl), every kCuda call and DeviceWorkspace::Create return
// Unimplemented and BuiltWithCuda() is false; the host reference is unaffected.
//
// Example:
//
//   // Once, e.g. per staging slot (capacity: the most fragments of one call):
//   absl::StatusOr<std::unique_ptr<DeviceWorkspace>> ws = DeviceWorkspace::Create(65536);
//   Launch gpu = Launch::Cuda(ws->get(), CudaStream(engine_stream));
//   absl::Status queued = Gather(gpu, fragments, staging, /*offset=*/0);
//   absl::Status done = Wait(gpu);  // or sync engine_stream yourself
//
// Thread safety: Launch and CudaStream are plain values. A DeviceWorkspace is
// used by one thread at a time; different workspaces are independent.

#ifndef KVX_KERNELS_LAUNCH_H_
#define KVX_KERNELS_LAUNCH_H_

#include <cstdint>
#include <memory>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvx::kernels_internal {
class Cuda;
}  // namespace kvx::kernels_internal

namespace kvx::kernels {

enum class Backend { kHost, kCuda };

// A CUDA stream without the CUDA type: the value of a cudaStream_t (which is a
// pointer). Does not own the stream. The default is the legacy default stream.
class CudaStream {
 public:
  CudaStream() = default;
  // `native` is a cudaStream_t: `CudaStream(static_cast<void*>(stream))`.
  explicit CudaStream(void* native) : native_(native) {}

  void* native() const { return native_; }

 private:
  void* native_ = nullptr;
};

// Caller-owned scratch for kCuda launches: a pinned host array and a device array
// of `capacity` + 1 entries of 16 bytes, and an event marking its last launch.
// A call fills the pinned array with its pointer list, copies it to the device on
// the launch's stream and launches; nothing is allocated per call.
//
// One launch in flight per workspace: a call first waits (on the host) until the
// previous launch that used this workspace has finished, then reuses it. Give
// each concurrently running stream or staging slot its own workspace to overlap
// launches. The workspace's memory lives on the device current at Create; launch
// on that device.
class DeviceWorkspace {
 public:
  // `capacity`: the most fragments one Gather/Scatter call may carry, and the most
  // blocks + parts of one SplitHeads/ConcatHeads call. Errors: InvalidArgument
  // for capacity < 1 or too large to address; Unimplemented without the toolkit;
  // the CUDA error (Unavailable without a driver or device, ResourceExhausted
  // out of memory) otherwise.
  ABSL_MUST_USE_RESULT static absl::StatusOr<std::unique_ptr<DeviceWorkspace>> Create(
      int64_t capacity);

  // Waits for the last launch that used this workspace, then frees it.
  ~DeviceWorkspace();
  DeviceWorkspace(const DeviceWorkspace&) = delete;
  DeviceWorkspace& operator=(const DeviceWorkspace&) = delete;

  int64_t capacity() const { return capacity_; }

 private:
  friend class kernels_internal::Cuda;
  DeviceWorkspace() = default;

  int64_t capacity_ = 0;
  void* host_entries_ = nullptr;    // pinned, capacity_ + 1 entries
  void* device_entries_ = nullptr;  // capacity_ + 1 entries
  void* last_launch_ = nullptr;     // a cudaEvent_t recorded after each launch
};

// How one kernel call runs; see the top of the file.
struct Launch {
  // The host reference.
  static Launch Host() { return Launch(); }
  // CUDA on `stream` with `workspace`. REQUIRES: `workspace` outlives every call
  // made with this Launch and their completion (it waits for its last launch when
  // destroyed).
  static Launch Cuda(DeviceWorkspace* workspace, CudaStream stream = CudaStream()) {
    Launch launch;
    launch.backend = Backend::kCuda;
    launch.workspace = workspace;
    launch.stream = stream;
    return launch;
  }

  Backend backend = Backend::kHost;
  DeviceWorkspace* workspace = nullptr;  // kCuda: required
  CudaStream stream;                     // kCuda only
};

// Blocks until every call queued with `launch` has finished. kHost: returns OK at
// once (host calls are synchronous). kCuda: synchronizes the stream and returns
// its error, which is also how a fault inside an earlier kernel (e.g. a pointer
// that was not device-accessible) is reported, as Internal; Unimplemented
// without the toolkit.
ABSL_MUST_USE_RESULT absl::Status Wait(const Launch& launch);

// True when this build of kvx compiled the CUDA kernels (the toolkit was found).
bool BuiltWithCuda();

}  // namespace kvx::kernels

#endif  // KVX_KERNELS_LAUNCH_H_
