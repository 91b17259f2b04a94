// kvplan pair: pairs a send slice with the receiver's suffix lists, per layer group
// (SEMANTICS.md section 5), through transfer::PairSliceBlocks.

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "tools/internal/kvplan_command.h"
#include "tools/internal/kvplan_json.h"
#include "transfer/slice.h"

namespace kvx::kvplan_internal {
namespace {

constexpr char kUsage[] = R"(
  pair      Pairs a send slice with the receiver's suffix lists, per layer group
            (section 5).
            in:  {"tokens_per_block", "prompt_len", "token_range"?: [s, e],
                  "windows": [null | W, ...], "src": [[ids], ...],
                  "dst": [[ids], ...], "dst_start_token"?: n}
            token_range defaults to [0, prompt_len) (none when prompt_len is 0,
            slice end 0). src, dst and windows list the same number of groups.
            A list one block longer than its suffix loses its last (draft) id;
            longer by more is an error, and so is a list that holds an id twice.
            out: {"groups": [{"src_start_token", "dst_start_token",
                              "src": [ids], "dst": [ids]}, ...]}
            the starts are where each given list starts (after the dst hint);
            src/dst are the paired ids that move.
)";

absl::StatusOr<ordered_json> Pair(const json& input) {
  absl::StatusOr<Fields> fields = Fields::Open(input, "",
                                               {"tokens_per_block", "prompt_len", "token_range",
                                                "windows", "src", "dst", "dst_start_token"});
  if (!fields.ok()) return fields.status();
  absl::StatusOr<int64_t> tpb = fields->Tokens("tokens_per_block", 1);
  if (!tpb.ok()) return tpb.status();
  absl::StatusOr<int64_t> prompt_len = fields->Tokens("prompt_len", 0);
  if (!prompt_len.ok()) return prompt_len.status();
  // A pair slice may be any range; only slice and transfer tie it to the prompt.
  absl::StatusOr<std::optional<transfer::TokenRange>> range =
      OptionalTokenRange(*fields, std::nullopt);
  if (!range.ok()) return range.status();
  std::optional<transfer::TokenRange> slice_range = *range;
  if (!slice_range && *prompt_len > 0) {
    slice_range = transfer::TokenRange::Create(0, *prompt_len).value();  // section 4 step 2
  }

  absl::StatusOr<const json*> windows_json = fields->Required("windows");
  if (!windows_json.ok()) return windows_json.status();
  if (absl::Status s = CheckGroupArray(**windows_json, "windows", "null or windows");
      !s.ok()) {
    return s;
  }
  std::vector<std::optional<int64_t>> windows;
  for (size_t g = 0; g < (*windows_json)->size(); ++g) {
    absl::StatusOr<std::optional<int64_t>> window =
        AsWindow((**windows_json)[g], absl::StrCat("windows[", g, "]"));
    if (!window.ok()) return window.status();
    windows.push_back(*window);
  }

  transfer::KVSlice src;
  transfer::KVSlice dst;
  for (auto [side, slice] : {std::pair{"src", &src}, std::pair{"dst", &dst}}) {
    absl::StatusOr<const json*> lists_json = fields->Required(side);
    if (!lists_json.ok()) return lists_json.status();
    absl::StatusOr<std::vector<transfer::BlockList>> lists = AsGroupLists(**lists_json, side);
    if (!lists.ok()) return lists.status();
    if (lists->size() != windows.size()) {
      return FieldError(side, absl::StrCat("must list one block list per layer group: ", side,
                                           "_groups=", lists->size(), " windows=", windows.size()));
    }
    slice->token_range = slice_range;
    slice->block_ids_per_layer_group = *std::move(lists);
  }
  absl::StatusOr<std::optional<int64_t>> hint = fields->OptionalTokens("dst_start_token", 0);
  if (!hint.ok()) return hint.status();

  transfer::PairingOptions options;
  options.tokens_per_block = *tpb;
  options.prompt_len = *prompt_len;
  options.windows = std::move(windows);
  options.dst_start_token = *hint;
  absl::StatusOr<std::vector<transfer::GroupPairing>> pairings =
      transfer::PairSliceBlocks(src, dst, options);
  if (!pairings.ok()) return pairings.status();

  ordered_json groups = ordered_json::array();
  for (const transfer::GroupPairing& pairing : *pairings) groups.push_back(PairingJson(pairing));
  ordered_json out;
  out["groups"] = std::move(groups);
  return out;
}

}  // namespace

const Command kPairCommand = {"pair", kUsage, &Pair};

}  // namespace kvx::kvplan_internal
