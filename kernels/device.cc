#include "kernels/device.h"

#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/internal/cuda.h"
#include "kernels/launch.h"

namespace kvx::kernels {
namespace {

using kernels_internal::Cuda;

absl::Status CheckRange(absl::string_view op, uint64_t offset, uint64_t size,
                        uint64_t buffer_bytes) {
  if (offset > buffer_bytes || size > buffer_bytes - offset) {
    return absl::OutOfRangeError(absl::StrCat(op, ": range past the device buffer: offset=",
                                              offset, " bytes=", size,
                                              " buffer_bytes=", buffer_bytes));
  }
  return absl::OkStatus();
}

void DestroyEvents(void* start, void* stop) {
  if (start != nullptr) Cuda::DestroyEvent(start);
  if (stop != nullptr) Cuda::DestroyEvent(stop);
}

}  // namespace

absl::StatusOr<int> CudaDeviceCount() { return Cuda::DeviceCount(); }

absl::StatusOr<DeviceBuffer> DeviceBuffer::Create(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("device buffer of 0 bytes");
  absl::StatusOr<void*> data = Cuda::Malloc(bytes);
  if (!data.ok()) return data.status();
  return DeviceBuffer(*data, bytes);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) Cuda::Free(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) Cuda::Free(data_);
}

absl::StatusOr<PinnedHostBuffer> PinnedHostBuffer::Create(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("pinned host buffer of 0 bytes");
  absl::StatusOr<void*> data = Cuda::MallocPinned(bytes);
  if (!data.ok()) return data.status();
  return PinnedHostBuffer(*data, bytes);
}

PinnedHostBuffer::PinnedHostBuffer(PinnedHostBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

PinnedHostBuffer& PinnedHostBuffer::operator=(PinnedHostBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) Cuda::FreePinned(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

PinnedHostBuffer::~PinnedHostBuffer() {
  if (data_ != nullptr) Cuda::FreePinned(data_);
}

absl::Status DeviceBuffer::CopyFromHost(uint64_t offset, absl::Span<const unsigned char> host) {
  absl::Status status = CheckRange("copy from host", offset, host.size(), bytes_);
  if (!status.ok()) return status;
  return Cuda::Copy(static_cast<unsigned char*>(data_) + offset, host.data(), host.size());
}

absl::Status DeviceBuffer::CopyToHost(uint64_t offset, absl::Span<unsigned char> host) const {
  absl::Status status = CheckRange("copy to host", offset, host.size(), bytes_);
  if (!status.ok()) return status;
  return Cuda::Copy(host.data(), static_cast<unsigned char*>(data_) + offset, host.size());
}

absl::Status CopyAsync(CudaStream stream, void* dst, const void* src, uint64_t bytes) {
  return Cuda::CopyAsync(stream, dst, src, bytes);
}

absl::StatusOr<DeviceTimer> DeviceTimer::Create() {
  absl::StatusOr<void*> start = Cuda::CreateTimingEvent();
  if (!start.ok()) return start.status();
  absl::StatusOr<void*> stop = Cuda::CreateTimingEvent();
  if (!stop.ok()) {
    DestroyEvents(*start, nullptr);
    return stop.status();
  }
  return DeviceTimer(*start, *stop);
}

DeviceTimer::DeviceTimer(DeviceTimer&& other) noexcept
    : start_(std::exchange(other.start_, nullptr)), stop_(std::exchange(other.stop_, nullptr)) {}

DeviceTimer& DeviceTimer::operator=(DeviceTimer&& other) noexcept {
  if (this != &other) {
    DestroyEvents(start_, stop_);
    start_ = std::exchange(other.start_, nullptr);
    stop_ = std::exchange(other.stop_, nullptr);
  }
  return *this;
}

DeviceTimer::~DeviceTimer() { DestroyEvents(start_, stop_); }

absl::Status DeviceTimer::Start(CudaStream stream) { return Cuda::RecordEvent(start_, stream); }

absl::Status DeviceTimer::Stop(CudaStream stream) { return Cuda::RecordEvent(stop_, stream); }

absl::StatusOr<double> DeviceTimer::ElapsedSeconds() const {
  return Cuda::ElapsedSeconds(start_, stop_);
}

}  // namespace kvx::kernels
