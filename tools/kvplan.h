// File: tools/kvplan.h
//
// The logic of `kvplan`, the command-line tool that explains a KV-cache transfer:
// JSON in, JSON out, through the planning core (transfer/slice.h,
// cache_reuse/adapter.h, transfer/scenario.h). The process around it is
// tools/kvplan_cli.h; each command, with its contract, is tools/kvplan_<command>.cc;
// the JSON reading they share is tools/internal/kvplan_json.h. tools/KVPLAN.md is
// the short version of all of it.
//
//   absl::StatusOr<std::string> out = kvx::kvplan::RunCommand(
//       "align", R"({"tokens_per_block": 8, "src": [1, 2, 3, 4], "dst": [7, 8],
//                   "src_start_token": 0, "dst_start_token": 16})");
//   // *out == "{\"src\":[3,4],\"dst\":[7,8]}\n"
//
// Thread safety: RunCommand is pure; call it from any thread.

#ifndef KVX_TOOLS_KVPLAN_H_
#define KVX_TOOLS_KVPLAN_H_

#include <string>

#include "absl/base/attributes.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvx::kvplan {

// True for "align", "pair", "slice", "transfer" and "fragments".
bool IsCommand(absl::string_view command);

// The text of `kvplan --help`: the input rules and bounds, every command's
// contract, examples.
std::string Usage();

// Parses `input_json` (one JSON object), runs `command` on it and returns its
// output: one line of JSON ending in '\n'.
//
// Errors, each one line of printable ASCII without the command name, any input
// text in it escaped and cut (KVPLAN.md, "Bounds and errors"): InvalidArgument for
// an unknown command, input past a bound (size, depth), malformed JSON (with line
// and column) and any input the contract rejects, naming the field
// ("context.groups[1].window: must be null or an integer in [1, 9007199254740991],
// got 0"); the planning core's own errors with their code and text
// (InvalidArgument, FailedPrecondition, OutOfRange, Unimplemented, and
// ResourceExhausted for a fragments plan past transfer::ScenarioLimits); Internal
// for a kvplan bug caught. Never throws.
ABSL_MUST_USE_RESULT absl::StatusOr<std::string> RunCommand(absl::string_view command,
                                                            absl::string_view input_json);

}  // namespace kvx::kvplan

#endif  // KVX_TOOLS_KVPLAN_H_
