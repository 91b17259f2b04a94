// Do not include directly: detail of tools/kvplan.h.
// IWYU pragma: private, include "tools/kvplan.h"
//
// A "slice input", what `slice` reads and what `transfer` and `fragments` read per
// side: the request-wide fields, the side's cache-reuse answers and its positional
// block tables; and the slice built from it through the real adapters
// (cache_reuse::BuildSlice), so the tool decides nothing the library does not.
//
// Thread safety: pure functions and plain values.

#ifndef KVX_TOOLS_INTERNAL_KVPLAN_SLICE_INPUT_H_
#define KVX_TOOLS_INTERNAL_KVPLAN_SLICE_INPUT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache_reuse/adapter.h"
#include "tools/internal/kvplan_json.h"
#include "transfer/slice.h"

namespace kvx::kvplan_internal {

// The request id the tool hands to the core; it shows up as request=0 in errors.
inline constexpr int64_t kRequestId = 0;

// The request-wide fields: tokens_per_block, prompt_len and token_range (ending
// within the prompt), all required but the range.
struct Shared {
  int64_t tokens_per_block = 0;
  int64_t prompt_len = 0;
  std::optional<transfer::TokenRange> token_range;
};
absl::StatusOr<Shared> ParseShared(const Fields& fields);

// The slice's end: token_range.end, the prompt length by default.
int64_t SliceEnd(const Shared& shared);

// The cache-manager answers a side describes ("reuse"; absent: disabled).
struct ReuseInput {
  enum class Adapter { kV1, kV2 };
  bool enabled = false;
  Adapter adapter = Adapter::kV1;
  int64_t prepopulated_prompt_len = 0;          // V1
  std::optional<int64_t> num_committed_tokens;  // V2; nullopt: unknown request
};

// One side's slice input, validated.
struct SliceInput {
  Shared shared;
  cache_reuse::Side side = cache_reuse::Side::kContext;
  bool generation_only = true;
  ReuseInput reuse;
  std::vector<cache_reuse::LayerGroupSpec> groups;
  std::vector<transfer::BlockList> tables;  // positional, one per group (empty: Mamba)
  std::optional<int64_t> dst_start_token;   // transfer's generation side only
};

// A side's cache answers: `generation_only` (default true) and `reuse`, into `input`.
absl::Status ParseCacheAnswers(const Fields& side, SliceInput* input);

// `groups` of a side: positional tables ({"window"?, "block_ids"}) or
// {"kind": "mamba"}; fills `tables`, one per group.
absl::StatusOr<std::vector<cache_reuse::LayerGroupSpec>> ParseGroups(
    const Fields& side, std::vector<transfer::BlockList>* tables);

// Parses a slice input at `path`. With `outer` (a transfer's side), the
// request-wide fields may be left out and must agree with `outer` when present,
// and the side is fixed to `fixed_side`.
absl::StatusOr<SliceInput> ParseSliceInput(const json& value, const std::string& path,
                                           const Shared* outer, cache_reuse::Side fixed_side);

// The slice section 4 builds for `input`, through a V1 or V2 adapter over managers
// that answer from the input's tables.
absl::StatusOr<cache_reuse::BuiltSlice> BuildSliceFromInput(const SliceInput& input);

// BuildSliceFromInput for a named side ("context: a block the transfer needs ...").
absl::StatusOr<cache_reuse::BuiltSlice> BuildSide(const SliceInput& input,
                                                  const char* side_name);

}  // namespace kvx::kvplan_internal

#endif  // KVX_TOOLS_INTERNAL_KVPLAN_SLICE_INPUT_H_
