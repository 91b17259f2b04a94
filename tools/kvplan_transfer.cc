// kvplan transfer: both sides of one request, what moves and why. Each side is a
// slice input built as `slice` builds it; the pairing is transfer::PairSliceBlocks;
// the counts explain every block of the slice.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cache_reuse/adapter.h"
#include "tools/internal/kvplan_command.h"
#include "tools/internal/kvplan_json.h"
#include "tools/internal/kvplan_slice_input.h"
#include "transfer/slice.h"

namespace kvx::kvplan_internal {
namespace {

using cache_reuse::LayerGroupSpec;
using cache_reuse::Side;

constexpr char kUsage[] = R"(
  transfer  Both sides of one request: what moves, what is skipped, and why.
            in:  {"tokens_per_block", "prompt_len", "token_range"?,
                  "dst_start_token"?, "context": {slice input},
                  "generation": {slice input}}
            Each side is a slice input without "side" (or with the matching one);
            its tokens_per_block, prompt_len and token_range may be left out and
            must agree when present; both sides list the same groups with the
            same windows. The generation side may carry dst_start_token instead of
            the top level (both: must agree). A side's list that holds a block id
            twice is an error.
            out: {"groups": [{"src_start_token", "dst_start_token", "src", "dst",
                              "window" | "kind": "mamba", "total_blocks", "moved",
                              "skipped_cached", "skipped_window", "skipped_hint"},
                             ...],
                  "totals": {the same five counts summed},
                  "token_range": [s, e] | null,
                  "cached_tokens": {"context": [...], "generation": [...]}}
            Counts, over the slice's blocks [0, total_blocks = cdiv(end, tpb)):
              skipped_window  min(stale_end, total_blocks) for a windowed group:
                              wholly outside the window of the next token
              skipped_cached  after those, blocks the generation side already
                              holds (its list starts later)
              skipped_hint    after those, blocks before dst_start_token
              moved           the pairs; the four add up to total_blocks
            Mamba groups count 0 everywhere.
)";

// Why each block of one group's slice does or does not move. Over the slice's
// blocks [0, total_blocks), in order: skipped_window (wholly outside the window),
// skipped_cached (the generation side holds them already), skipped_hint (before
// the receiver's dst_start_token), then the moved blocks. They add up to
// total_blocks; the core's pairing is checked against that.
struct GroupCounts {
  int64_t total_blocks = 0;
  int64_t moved = 0;
  int64_t skipped_cached = 0;
  int64_t skipped_window = 0;
  int64_t skipped_hint = 0;

  void Add(const GroupCounts& other) {
    total_blocks += other.total_blocks;
    moved += other.moved;
    skipped_cached += other.skipped_cached;
    skipped_window += other.skipped_window;
    skipped_hint += other.skipped_hint;
  }

  ordered_json ToJson() const {
    ordered_json out;
    out["total_blocks"] = total_blocks;
    out["moved"] = moved;
    out["skipped_cached"] = skipped_cached;
    out["skipped_window"] = skipped_window;
    out["skipped_hint"] = skipped_hint;
    return out;
  }
};

absl::StatusOr<GroupCounts> CountGroup(const SliceInput& input, const LayerGroupSpec& spec,
                                       size_t group, const transfer::BlockList& generation_list,
                                       const transfer::GroupPairing& pairing) {
  GroupCounts counts;
  if (spec.kind == LayerGroupSpec::Kind::kMamba) return counts;
  const int64_t tpb = input.shared.tokens_per_block;
  counts.total_blocks = transfer::CeilDiv(SliceEnd(input.shared), tpb);
  absl::StatusOr<transfer::WindowBlocks> window =
      transfer::ComputeWindowBlocks(input.shared.prompt_len, spec.window, tpb);
  if (!window.ok()) return window.status();
  counts.skipped_window = std::min(window->stale_end, counts.total_blocks);
  // Built lists are suffixes of [0, total_blocks): the length says where they start.
  const int64_t held_until = counts.total_blocks - static_cast<int64_t>(generation_list.size());
  counts.skipped_cached = std::max<int64_t>(0, held_until - counts.skipped_window);
  const int64_t hint_block = std::min(counts.total_blocks, pairing.dst_start_token / tpb);
  counts.skipped_hint =
      std::max<int64_t>(0, hint_block - std::max(counts.skipped_window, held_until));
  counts.moved = static_cast<int64_t>(pairing.src.size());
  // The context side sends [stale_end, total), so every block is accounted for
  // exactly once; anything else is a disagreement between this tool and the core.
  if (counts.skipped_window + counts.skipped_cached + counts.skipped_hint + counts.moved !=
      counts.total_blocks) {
    return absl::InternalError(absl::StrCat(
        "block counts do not add up: group=", group, " total_blocks=", counts.total_blocks,
        " moved=", counts.moved, " skipped_cached=", counts.skipped_cached,
        " skipped_window=", counts.skipped_window, " skipped_hint=", counts.skipped_hint));
  }
  return counts;
}

std::string DescribeGroup(const LayerGroupSpec& spec) {
  if (spec.kind == LayerGroupSpec::Kind::kMamba) return "mamba";
  return spec.window ? absl::StrCat("window ", *spec.window) : std::string("full");
}

absl::StatusOr<ordered_json> Transfer(const json& input) {
  absl::StatusOr<Fields> fields = Fields::Open(input, "",
                                               {"tokens_per_block", "prompt_len", "token_range",
                                                "dst_start_token", "context", "generation"});
  if (!fields.ok()) return fields.status();
  absl::StatusOr<Shared> parsed_shared = ParseShared(*fields);
  if (!parsed_shared.ok()) return parsed_shared.status();
  const Shared& shared = *parsed_shared;

  absl::StatusOr<const json*> context_json = fields->Required("context");
  if (!context_json.ok()) return context_json.status();
  absl::StatusOr<SliceInput> context =
      ParseSliceInput(**context_json, "context", &shared, Side::kContext);
  if (!context.ok()) return context.status();
  absl::StatusOr<const json*> generation_json = fields->Required("generation");
  if (!generation_json.ok()) return generation_json.status();
  absl::StatusOr<SliceInput> generation =
      ParseSliceInput(**generation_json, "generation", &shared, Side::kGeneration);
  if (!generation.ok()) return generation.status();

  absl::StatusOr<std::optional<int64_t>> hint = fields->OptionalTokens("dst_start_token", 0);
  if (!hint.ok()) return hint.status();
  if (*hint && generation->dst_start_token && **hint != *generation->dst_start_token) {
    return FieldError("generation.dst_start_token",
                      absl::StrCat("must agree with the top-level dst_start_token, got ",
                                   *generation->dst_start_token, " vs ", **hint));
  }
  if (!*hint) *hint = generation->dst_start_token;

  // Both sides must describe the same model: same groups, same windows.
  if (context->groups.size() != generation->groups.size()) {
    return FieldError(
        "generation.groups",
        absl::StrCat("must list the same layer groups as context.groups: "
                     "context_groups=",
                     context->groups.size(), " generation_groups=", generation->groups.size()));
  }
  std::vector<std::optional<int64_t>> windows;
  for (size_t g = 0; g < context->groups.size(); ++g) {
    const LayerGroupSpec& c = context->groups[g];
    const LayerGroupSpec& d = generation->groups[g];
    if (c.kind != d.kind || c.window != d.window) {
      return FieldError(absl::StrCat("generation.groups[", g, "]"),
                        absl::StrCat("must match context.groups[", g,
                                     "]: context=", DescribeGroup(c),
                                     " generation=", DescribeGroup(d)));
    }
    windows.push_back(c.kind == LayerGroupSpec::Kind::kMamba ? std::nullopt : c.window);
  }

  absl::StatusOr<cache_reuse::BuiltSlice> src = BuildSide(*context, "context");
  if (!src.ok()) return src.status();
  absl::StatusOr<cache_reuse::BuiltSlice> dst = BuildSide(*generation, "generation");
  if (!dst.ok()) return dst.status();

  transfer::PairingOptions options;
  options.tokens_per_block = shared.tokens_per_block;
  options.prompt_len = shared.prompt_len;
  options.windows = windows;
  options.dst_start_token = *hint;
  options.request_id = kRequestId;
  absl::StatusOr<std::vector<transfer::GroupPairing>> pairings =
      transfer::PairSliceBlocks(src->slice, dst->slice, options);
  if (!pairings.ok()) return pairings.status();

  ordered_json groups = ordered_json::array();
  GroupCounts totals;
  for (size_t g = 0; g < pairings->size(); ++g) {
    const LayerGroupSpec& spec = context->groups[g];
    absl::StatusOr<GroupCounts> counts =
        CountGroup(*context, spec, g, dst->slice.block_ids_per_layer_group[g], (*pairings)[g]);
    if (!counts.ok()) return counts.status();
    totals.Add(*counts);
    ordered_json group = PairingJson((*pairings)[g]);
    if (spec.kind == LayerGroupSpec::Kind::kMamba) {
      group["kind"] = "mamba";
    } else {
      group["window"] = spec.window ? ordered_json(*spec.window) : ordered_json(nullptr);
    }
    group.update(counts->ToJson());
    groups.push_back(std::move(group));
  }
  ordered_json out;
  out["groups"] = std::move(groups);
  out["totals"] = totals.ToJson();
  out["token_range"] = RangeJson(src->slice.token_range);
  out["cached_tokens"] = {{"context", src->cached_tokens}, {"generation", dst->cached_tokens}};
  return out;
}

}  // namespace

const Command kTransferCommand = {"transfer", kUsage, &Transfer};

}  // namespace kvx::kvplan_internal
