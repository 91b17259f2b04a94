// kvplan slice: builds one side's slice from its cache manager (SEMANTICS.md
// sections 3-4), through cache_reuse::BuildSlice. The input is a slice input
// (tools/internal/kvplan_slice_input.h), which transfer and fragments read per side.

#include "absl/status/statusor.h"
#include "cache_reuse/adapter.h"
#include "tools/internal/kvplan_command.h"
#include "tools/internal/kvplan_json.h"
#include "tools/internal/kvplan_slice_input.h"

namespace kvx::kvplan_internal {
namespace {

constexpr char kUsage[] = R"(
  slice     Builds one side's slice from its cache manager (sections 3-4).
            in:  {"tokens_per_block", "prompt_len", "token_range"?,
                  "side": "context" | "generation",
                  "generation_only"?: bool (default true),
                  "reuse"?: {"enabled": bool, "adapter": "v1",
                             "prepopulated_prompt_len": n}
                          | {"enabled": bool, "adapter": "v2",
                             "num_committed_tokens": n | null},
                  "groups": [{"window"?: null | W, "block_ids": [ids]}
                             | {"kind": "mamba"}, ...]}
            reuse absent: disabled (V1 manager, nothing cached). The count field
            may be left out only when enabled is false; num_committed_tokens null
            means the manager does not know the request (counts 0).
            block_ids is a positional table: entry b holds tokens
            [b*tpb, (b+1)*tpb), -1 = not held, entries past the prompt's last
            block are draft-token blocks. window absent or null: full attention.
            The v2 manager keeps what follows the leading -1 entries as its pages.
            out: {"token_range": [s, e] | null, "cached_tokens": [n per group],
                  "block_ids": [[suffix list that travels], ...]}
)";

absl::StatusOr<ordered_json> Slice(const json& input_json) {
  absl::StatusOr<SliceInput> input =
      ParseSliceInput(input_json, "", /*outer=*/nullptr, cache_reuse::Side::kContext);
  if (!input.ok()) return input.status();
  absl::StatusOr<cache_reuse::BuiltSlice> built = BuildSliceFromInput(*input);
  if (!built.ok()) return built.status();
  ordered_json out;
  out["token_range"] = RangeJson(built->slice.token_range);
  out["cached_tokens"] = built->cached_tokens;
  out["block_ids"] = built->slice.block_ids_per_layer_group;
  return out;
}

}  // namespace

const Command kSliceCommand = {"slice", kUsage, &Slice};

}  // namespace kvx::kvplan_internal
