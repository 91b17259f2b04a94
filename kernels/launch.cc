#include "kernels/launch.h"

#include <cstdint>
#include <memory>

#include "absl/memory/memory.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/internal/cuda.h"

namespace kvx::kernels {

using kernels_internal::Cuda;

absl::StatusOr<std::unique_ptr<DeviceWorkspace>> DeviceWorkspace::Create(int64_t capacity) {
  // Far above any plan (64 GiB of entries), and (capacity + 1) * 16 stays far
  // inside 64 bits.
  constexpr int64_t kMaxCapacity = int64_t{1} << 32;
  if (capacity < 1 || capacity > kMaxCapacity) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workspace capacity out of range: capacity=", capacity, " max=", kMaxCapacity));
  }
  auto workspace = absl::WrapUnique(new DeviceWorkspace());
  absl::Status status = Cuda::InitWorkspace(capacity, workspace.get());
  if (!status.ok()) return status;
  return workspace;
}

DeviceWorkspace::~DeviceWorkspace() { Cuda::ReleaseWorkspace(this); }

absl::Status Wait(const Launch& launch) {
  if (launch.backend == Backend::kHost) return absl::OkStatus();
  return Cuda::Synchronize(launch.stream);
}

bool BuiltWithCuda() { return Cuda::Built(); }

}  // namespace kvx::kernels

namespace kvx::kernels_internal {

absl::Status CheckLaunch(const kernels::Launch& launch, absl::string_view op,
                         uint64_t entries) {
  if (launch.backend == kernels::Backend::kHost) return absl::OkStatus();
  if (!Cuda::Built()) {
    return absl::UnimplementedError(
        absl::StrCat(op, ": backend=cuda in a build without the CUDA toolkit (see "
                         "kernels/README.md)"));
  }
  if (launch.workspace == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": backend=cuda needs a workspace"));
  }
  if (entries > static_cast<uint64_t>(launch.workspace->capacity())) {
    return absl::ResourceExhaustedError(
        absl::StrCat(op, ": list longer than the workspace: entries=", entries,
                     " capacity=", launch.workspace->capacity()));
  }
  return absl::OkStatus();
}

}  // namespace kvx::kernels_internal
