// kvplan align: pairs two block lists by the tokens they cover (SEMANTICS.md
// section 5 step 7), through transfer::AlignBlocks.

#include "absl/status/statusor.h"
#include "tools/internal/kvplan_command.h"
#include "tools/internal/kvplan_json.h"
#include "transfer/slice.h"

namespace kvx::kvplan_internal {
namespace {

constexpr char kUsage[] = R"(
  align     Pairs two block lists by the tokens they cover (section 5 step 7).
            in:  {"tokens_per_block", "src": [ids], "dst": [ids],
                  "src_start_token", "dst_start_token"}        (all required)
            A list holds each id once.
            out: {"src": [ids], "dst": [ids]}   src[i] is written into dst[i]
)";

absl::StatusOr<ordered_json> Align(const json& input) {
  absl::StatusOr<Fields> fields = Fields::Open(
      input, "", {"tokens_per_block", "src", "dst", "src_start_token", "dst_start_token"});
  if (!fields.ok()) return fields.status();
  absl::StatusOr<int64_t> tpb = fields->Tokens("tokens_per_block", 1);
  if (!tpb.ok()) return tpb.status();
  absl::StatusOr<const json*> src_json = fields->Required("src");
  if (!src_json.ok()) return src_json.status();
  absl::StatusOr<transfer::BlockList> src = AsBlockList(**src_json, "src", false);
  if (!src.ok()) return src.status();
  absl::StatusOr<const json*> dst_json = fields->Required("dst");
  if (!dst_json.ok()) return dst_json.status();
  absl::StatusOr<transfer::BlockList> dst = AsBlockList(**dst_json, "dst", false);
  if (!dst.ok()) return dst.status();
  absl::StatusOr<int64_t> src_start = fields->Tokens("src_start_token", 0);
  if (!src_start.ok()) return src_start.status();
  absl::StatusOr<int64_t> dst_start = fields->Tokens("dst_start_token", 0);
  if (!dst_start.ok()) return dst_start.status();

  absl::StatusOr<transfer::AlignedBlocks> aligned =
      transfer::AlignBlocks(*src, *src_start, *dst, *dst_start, *tpb);
  if (!aligned.ok()) return aligned.status();
  ordered_json out;
  out["src"] = aligned->src;
  out["dst"] = aligned->dst;
  return out;
}

}  // namespace

const Command kAlignCommand = {"align", kUsage, &Align};

}  // namespace kvx::kvplan_internal
