// File: kernels/device.h
//
// The little of the CUDA runtime that kvx code outside the kernels needs, without
// naming a CUDA type: how many devices there are, device memory and pinned host
// memory that free themselves, an asynchronous copy (the cudaMemcpy the kernels are measured against)
// and a timer made of two CUDA events (for benchmarks that time device work).
// Built without the CUDA toolkit, every call returns Unimplemented.
//
// Example (a test that needs a GPU):
//
//   absl::StatusOr<int> devices = CudaDeviceCount();
//   if (!devices.ok() || *devices == 0) GTEST_SKIP() << "no CUDA device";
//   absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Create(1 << 20);
//   absl::Status s = buffer->CopyFromHost(0, host_bytes);
//
// Thread safety: a DeviceBuffer or DeviceTimer is used by one thread at a time.

#ifndef KVX_KERNELS_DEVICE_H_
#define KVX_KERNELS_DEVICE_H_

#include <cstdint>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/launch.h"

namespace kvx::kernels {

// The number of CUDA devices visible to this process. Errors: Unimplemented
// without the toolkit; Unavailable when there is no driver or no device (the
// CUDA error is named).
ABSL_MUST_USE_RESULT absl::StatusOr<int> CudaDeviceCount();

// `bytes` bytes of device memory on the current device (cudaMalloc), freed on
// destruction. Move-only.
class DeviceBuffer {
 public:
  // Errors: InvalidArgument for 0 bytes; Unimplemented without the toolkit;
  // the CUDA error (ResourceExhausted out of memory) otherwise.
  ABSL_MUST_USE_RESULT static absl::StatusOr<DeviceBuffer> Create(uint64_t bytes);

  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  ~DeviceBuffer();

  void* data() const { return data_; }
  uint64_t bytes() const { return bytes_; }

  // Synchronous copies between host memory and [offset, offset + size) of this
  // buffer. Errors: OutOfRange past the end; the CUDA error otherwise.
  ABSL_MUST_USE_RESULT absl::Status CopyFromHost(uint64_t offset,
                                                 absl::Span<const unsigned char> host);
  ABSL_MUST_USE_RESULT absl::Status CopyToHost(uint64_t offset,
                                               absl::Span<unsigned char> host) const;

 private:
  DeviceBuffer(void* data, uint64_t bytes) : data_(data), bytes_(bytes) {}

  void* data_ = nullptr;
  uint64_t bytes_ = 0;
};

// `bytes` bytes of page-locked host memory mapped for the device (cudaHostAlloc),
// freed on destruction: a staging buffer that kernels write and a NIC reads (or the
// reverse) when device memory itself cannot be registered. Move-only.
class PinnedHostBuffer {
 public:
  // Errors: InvalidArgument for 0 bytes; Unimplemented without the toolkit; the
  // CUDA error otherwise.
  ABSL_MUST_USE_RESULT static absl::StatusOr<PinnedHostBuffer> Create(uint64_t bytes);
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer& operator=(PinnedHostBuffer&& other) noexcept;
  ~PinnedHostBuffer();

  void* data() const { return data_; }
  uint64_t bytes() const { return bytes_; }

 private:
  PinnedHostBuffer(void* data, uint64_t bytes) : data_(data), bytes_(bytes) {}
  void* data_ = nullptr;
  uint64_t bytes_ = 0;
};

// cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream): any direction
// between device-accessible buffers, queued on `stream`.
ABSL_MUST_USE_RESULT absl::Status CopyAsync(CudaStream stream, void* dst, const void* src,
                                            uint64_t bytes);

// Device time between Start and Stop on one stream, from two CUDA events.
class DeviceTimer {
 public:
  // Errors: Unimplemented without the toolkit; the CUDA error otherwise.
  ABSL_MUST_USE_RESULT static absl::StatusOr<DeviceTimer> Create();

  DeviceTimer(DeviceTimer&& other) noexcept;
  DeviceTimer& operator=(DeviceTimer&& other) noexcept;
  ~DeviceTimer();

  // Record the start and stop events on `stream`.
  ABSL_MUST_USE_RESULT absl::Status Start(CudaStream stream);
  ABSL_MUST_USE_RESULT absl::Status Stop(CudaStream stream);
  // Waits for the stop event and returns the seconds between the two.
  // REQUIRES: Start and Stop were recorded.
  ABSL_MUST_USE_RESULT absl::StatusOr<double> ElapsedSeconds() const;

 private:
  DeviceTimer(void* start, void* stop) : start_(start), stop_(stop) {}

  void* start_ = nullptr;  // cudaEvent_t
  void* stop_ = nullptr;   // cudaEvent_t
};

}  // namespace kvx::kernels

#endif  // KVX_KERNELS_DEVICE_H_
