#include "kernels/heads.h"

#include <cstdint>
#include <cstring>
#include <string>

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

using kernels_internal::CopyEntry;
using kernels_internal::Cuda;
using kernels_internal::HeadCopy;
using kernels_internal::HeadDirection;
using kernels_internal::HeadUnit;

std::string LayoutText(const HeadLayout& layout) {
  return absl::StrCat("layers=", layout.layers, " kv_heads_per_rank=", layout.kv_heads_per_rank,
                      " tokens_per_block=", layout.tokens_per_block,
                      " head_size=", layout.head_size, " element_bytes=", layout.element_bytes);
}

uintptr_t Address(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer); }

// Checks everything before a byte moves, so a rejected call writes nothing.
// `blocks` and `parts` are the two pointer lists, whichever side reads.
template <typename BlockPointer, typename PartPointer>
absl::StatusOr<HeadCopy> CheckCall(absl::string_view op, HeadDirection direction,
                                   const Launch& launch, const HeadLayout& layout,
                                   absl::Span<BlockPointer const> blocks,
                                   absl::Span<PartPointer const> parts) {
  absl::StatusOr<uint64_t> block_bytes = BlockBytes(layout);
  if (!block_bytes.ok()) {
    return absl::Status(block_bytes.status().code(),
                        absl::StrCat(op, ": ", block_bytes.status().message()));
  }
  if (parts.empty() || layout.kv_heads_per_rank % static_cast<int64_t>(parts.size()) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": kv_heads_per_rank is not a positive multiple of parts: parts=",
                     parts.size(), " ", LayoutText(layout)));
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": block is null: block=", i));
    }
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": part is null: part=", i));
    }
  }
  uint64_t total = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(blocks.size()), *block_bytes, &total)) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": total bytes overflow 64 bits: blocks=", blocks.size(),
                     " block_bytes=", *block_bytes));
  }
  absl::Status status =
      kernels_internal::CheckLaunch(launch, op, blocks.size() + parts.size());
  if (!status.ok()) return status;

  const uint64_t head_bytes = static_cast<uint64_t>(layout.tokens_per_block) *
                              static_cast<uint64_t>(layout.head_size) *
                              static_cast<uint64_t>(layout.element_bytes);
  const uint64_t heads_per_part = static_cast<uint64_t>(layout.kv_heads_per_rank) / parts.size();
  return HeadCopy{direction,
                  blocks.size(),
                  parts.size(),
                  static_cast<uint64_t>(layout.layers),
                  head_bytes,
                  heads_per_part * head_bytes};
}

template <typename BlockPointer, typename PartPointer>
absl::Status Run(absl::string_view op, HeadDirection direction, const Launch& launch,
                 const HeadLayout& layout, absl::Span<BlockPointer const> blocks,
                 absl::Span<PartPointer const> parts) {
  absl::StatusOr<HeadCopy> copy = CheckCall(op, direction, launch, layout, blocks, parts);
  if (!copy.ok()) return copy.status();
  if (blocks.empty()) return absl::OkStatus();

  if (launch.backend == Backend::kHost) {
    // The host reference: one memcpy per head run, at the offsets the kernel uses.
    for (uint64_t u = 0; u < copy->units(); ++u) {
      const HeadUnit unit = kernels_internal::LocateHeadUnit(*copy, u);
      const uintptr_t block = Address(blocks[unit.block]) + unit.block_offset;
      const uintptr_t part = Address(parts[unit.part]) + unit.part_offset;
      const bool split = direction == HeadDirection::kSplit;
      std::memcpy(reinterpret_cast<void*>(split ? part : block),
                  reinterpret_cast<const void*>(split ? block : part), copy->run_bytes);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<absl::Span<CopyEntry>> entries = Cuda::AcquireEntries(launch.workspace);
  if (!entries.ok()) return entries.status();
  for (size_t i = 0; i < blocks.size(); ++i) (*entries)[i] = CopyEntry{Address(blocks[i]), 0};
  for (size_t i = 0; i < parts.size(); ++i) {
    (*entries)[blocks.size() + i] = CopyEntry{Address(parts[i]), 0};
  }
  return Cuda::LaunchHeads(launch, *copy);
}

}  // namespace

absl::StatusOr<uint64_t> BlockBytes(const HeadLayout& layout) {
  const struct {
    const char* name;
    int64_t value;
  } fields[] = {{"layers", layout.layers},
                {"kv_heads_per_rank", layout.kv_heads_per_rank},
                {"tokens_per_block", layout.tokens_per_block},
                {"head_size", layout.head_size},
                {"element_bytes", layout.element_bytes}};
  uint64_t bytes = 2;  // K and V
  for (const auto& field : fields) {
    if (field.value < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "head layout field < 1: field=", field.name, " value=", field.value));
    }
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(field.value), &bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("head layout: block bytes overflow 64 bits: ", LayoutText(layout)));
    }
  }
  return bytes;
}

absl::Status SplitHeads(const Launch& launch, const HeadLayout& layout,
                        absl::Span<const void* const> src_blocks,
                        absl::Span<void* const> dst_parts) {
  return Run("split heads", HeadDirection::kSplit, launch, layout, src_blocks, dst_parts);
}

absl::Status ConcatHeads(const Launch& launch, const HeadLayout& layout,
                         absl::Span<const void* const> src_parts,
                         absl::Span<void* const> dst_blocks) {
  return Run("concat heads", HeadDirection::kConcat, launch, layout, dst_blocks, src_parts);
}

}  // namespace kvx::kernels
