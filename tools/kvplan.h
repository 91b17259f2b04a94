// File: tools/kvplan.h
//
// The logic of `kvplan`, the command-line tool that explains a KV-cache transfer:
// JSON in, JSON out, through the planning core (transfer/slice.h,
// cache_reuse/adapter.h, transfer/scenario.h). The binary (tools/kvplan_main.cc) only reads the input,
// calls RunCommand and prints; everything the tool decides is here, so it is tested
// without a process. The contract of each command is the usage text in
// kvplan_main.cc and tools/KVPLAN.md.
//
//   absl::StatusOr<std::string> out = kvx::kvplan::RunCommand(
//       "align", R"({"tokens_per_block": 8, "src": [1, 2, 3, 4], "dst": [7, 8],
//                   "src_start_token": 0, "dst_start_token": 16})");
//   // *out == "{\"src\":[3,4],\"dst\":[7,8]}\n"
//
// Thread safety: RunCommand is pure; call it from any thread.

#ifndef KVX_TOOLS_KVPLAN_H_
#define KVX_TOOLS_KVPLAN_H_

#include <cstdint>

#include "absl/base/attributes.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvx::kvplan {

// The largest token count or position the tool accepts: 2^53 - 1, JSON's safe
// integer range, far past any prompt and small enough that the core's block
// arithmetic cannot overflow int64. Block ids may use the whole int64 range.
inline constexpr int64_t kMaxTokens = (int64_t{1} << 53) - 1;

// True for "align", "pair", "slice", "transfer" and "fragments".
bool IsCommand(absl::string_view command);

// Parses `input_json` (one JSON object), runs `command` on it and returns its
// output: one line of JSON ending in '\n'.
//
// Errors, each a one-line message without the command name:
// InvalidArgument for an unknown command, malformed JSON (with line and column)
// and any input the contract rejects, naming the field ("context.groups[1].window:
// must be null or an integer > 0, got number 0"); the planning core's own errors
// (InvalidArgument, FailedPrecondition, and for fragments also OutOfRange and
// Unimplemented) with their code and text.
ABSL_MUST_USE_RESULT absl::StatusOr<std::string> RunCommand(absl::string_view command,
                                                            absl::string_view input_json);

}  // namespace kvx::kvplan

#endif  // KVX_TOOLS_KVPLAN_H_
