#include "tools/kvplan.h"

#include <new>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "tools/internal/kvplan_command.h"
#include "tools/internal/kvplan_json.h"

namespace kvx::kvplan {
namespace {

using kvplan_internal::Command;

const Command* const kCommands[] = {
    &kvplan_internal::kAlignCommand,    &kvplan_internal::kPairCommand,
    &kvplan_internal::kSliceCommand,    &kvplan_internal::kTransferCommand,
    &kvplan_internal::kFragmentsCommand,
};

const Command* FindCommand(absl::string_view name) {
  for (const Command* command : kCommands) {
    if (command->name == name) return command;
  }
  return nullptr;
}

constexpr char kHeader[] = R"(explains what a KV-cache transfer moves, and why.

Usage: kvplan <command> [file]      (no file or "-": read stdin)
       kvplan --help
Reads one JSON object, prints one line of JSON on stdout and exits 0. On rejected
input it exits 1 with one line on stderr naming the offending field (printable
ASCII, at most 1 KiB; input text in it is escaped and cut) and prints nothing on
stdout. kvplan takes no flags: any other argument that starts with "-" is
rejected ("--" ends the options, "-" is stdin).
Input: at most 16 MiB, no NUL byte, nesting at most 32 deep, at most 65536 layer
groups in a list. Unknown fields and fields given twice are rejected (a typo
never becomes a default); an optional field given as null counts as absent.
Integers only (no 8.0, no "8"); token counts and positions are 0 <= n <= 2^53-1,
tokens_per_block >= 1, block ids 0 <= id <= 2^53-1 (-1: not held, in positional
tables), num_slots <= 2^53. token_range is [start, end] with 0 <= start < end; in
slice and transfer also end <= prompt_len. Semantics: SEMANTICS.md sections 2-6.

Commands:
)";

constexpr char kExamples[] = R"(
Examples:
  echo '{"tokens_per_block": 8, "src": [10, 11, 12, 13], "dst": [22, 23],
         "src_start_token": 0, "dst_start_token": 16}' |
    bazel run //tools:kvplan -- align
  echo '{"tokens_per_block": 8, "prompt_len": 32, "windows": [null, 24],
         "src": [[1, 2, 3, 4], [10, 11]], "dst": [[22, 23], [20, 21, 22]]}' |
    bazel run //tools:kvplan -- pair
  bazel run //tools:kvplan -- transfer $PWD/tools/examples/transfer_example.json
  bazel run //tools:kvplan -- fragments $PWD/tools/examples/fragments_example.json
A relative file under `bazel run` resolves against the directory bazel was run
from (BUILD_WORKING_DIRECTORY).)";

}  // namespace

bool IsCommand(absl::string_view command) { return FindCommand(command) != nullptr; }

std::string Usage() {
  std::string usage = kHeader;
  for (const Command* command : kCommands) absl::StrAppend(&usage, command->usage);
  return absl::StrCat(usage, kExamples);
}

absl::StatusOr<std::string> RunCommand(absl::string_view command, absl::string_view input_json) {
  const Command* found = FindCommand(command);
  if (found == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown command: ", kvplan_internal::Escape(command),
                     " (expected align, pair, slice, transfer or fragments)"));
  }
  absl::StatusOr<kvplan_internal::json> input = kvplan_internal::ParseInput(input_json);
  if (!input.ok()) {
    return absl::Status(input.status().code(), kvplan_internal::OneLine(input.status().message()));
  }
  // Every JSON access checks the type first and every size is bounded before it is
  // allocated: either exception here is a kvplan bug, reported, never thrown on.
  absl::StatusOr<std::string> output;
  try {
    absl::StatusOr<kvplan_internal::ordered_json> out = found->run(*input);
    if (!out.ok()) {
      return absl::Status(out.status().code(), kvplan_internal::OneLine(out.status().message()));
    }
    output = absl::StrCat(out->dump(), "\n");
  } catch (const kvplan_internal::json::exception& e) {
    return absl::InternalError(
        kvplan_internal::OneLine(absl::StrCat("unexpected JSON error: ", e.what())));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory");
  }
  return output;
}

}  // namespace kvx::kvplan
