#include "kernels/staging.h"

#include <cstdint>
#include <cstring>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/internal/copy_kernels.h"
#include "kernels/internal/cuda.h"
#include "kernels/launch.h"

namespace kvx::kernels {
namespace {

using kernels_internal::CopyDirection;
using kernels_internal::CopyEntry;
using kernels_internal::Cuda;

// Everything is checked before a byte moves, so a rejected call writes nothing.
// Returns the bytes the fragments add up to.
template <typename Fragment>
absl::StatusOr<uint64_t> CheckCall(absl::string_view op, const Launch& launch,
                                   absl::Span<const Fragment> fragments,
                                   StagingBuffer staging, uint64_t offset) {
  if (staging.data == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": staging buffer is null: staging_bytes=", staging.bytes));
  }
  uint64_t end = offset;
  for (size_t i = 0; i < fragments.size(); ++i) {
    const Fragment& fragment = fragments[i];
    if (fragment.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": fragment is null: fragment=", i,
                                                     " bytes=", fragment.bytes));
    }
    if (fragment.bytes > UINT64_MAX - end) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": staging end overflows 64 bits: fragment=", i,
                       " bytes=", fragment.bytes, " end=", end, " offset=", offset));
    }
    end += fragment.bytes;
  }
  if (end > staging.bytes) {
    return absl::OutOfRangeError(absl::StrCat(
        op, ": fragments end past the staging buffer: offset=", offset,
        " bytes=", end - offset, " end=", end, " staging_bytes=", staging.bytes,
        " fragments=", fragments.size()));
  }
  absl::Status status = kernels_internal::CheckLaunch(launch, op, fragments.size());
  if (!status.ok()) return status;
  return end - offset;
}

// The host reference: one memcpy per fragment.
void HostCopy(const SrcFragment& fragment, unsigned char* packed) {
  std::memcpy(packed, fragment.data, fragment.bytes);
}
void HostCopy(const DstFragment& fragment, const unsigned char* packed) {
  std::memcpy(fragment.data, packed, fragment.bytes);
}

template <typename Fragment>
absl::Status Run(absl::string_view op, CopyDirection direction, const Launch& launch,
                 absl::Span<const Fragment> fragments, StagingBuffer staging,
                 uint64_t offset) {
  absl::StatusOr<uint64_t> total = CheckCall(op, launch, fragments, staging, offset);
  if (!total.ok()) return total.status();
  unsigned char* packed = static_cast<unsigned char*>(staging.data) + offset;

  if (launch.backend == Backend::kHost) {
    for (const Fragment& fragment : fragments) {
      HostCopy(fragment, packed);
      packed += fragment.bytes;
    }
    return absl::OkStatus();
  }

  if (*total == 0) return absl::OkStatus();
  absl::StatusOr<absl::Span<CopyEntry>> entries = Cuda::AcquireEntries(launch.workspace);
  if (!entries.ok()) return entries.status();
  uint64_t position = 0;
  for (size_t i = 0; i < fragments.size(); ++i) {
    (*entries)[i] = CopyEntry{reinterpret_cast<uintptr_t>(fragments[i].data), position};
    position += fragments[i].bytes;
  }
  (*entries)[fragments.size()] = CopyEntry{0, position};
  return Cuda::LaunchCopy(launch, fragments.size(), direction, packed, *total);
}

}  // namespace

absl::Status Gather(const Launch& launch, absl::Span<const SrcFragment> fragments,
                    StagingBuffer staging, uint64_t offset) {
  return Run("gather", CopyDirection::kGather, launch, fragments, staging, offset);
}

absl::Status Scatter(const Launch& launch, StagingBuffer staging, uint64_t offset,
                     absl::Span<const DstFragment> fragments) {
  return Run("scatter", CopyDirection::kScatter, launch, fragments, staging, offset);
}

}  // namespace kvx::kernels
