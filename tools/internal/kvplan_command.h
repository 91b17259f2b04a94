// Do not include directly: detail of tools/kvplan.h.
// IWYU pragma: private, include "tools/kvplan.h"
//
// One kvplan command: its name, its contract as --help prints it, and its body.
// Each lives in its own file, tools/kvplan_<name>.cc, so that a command's input,
// bounds and output are read in one place; tools/kvplan.cc lists them.

#ifndef KVX_TOOLS_INTERNAL_KVPLAN_COMMAND_H_
#define KVX_TOOLS_INTERNAL_KVPLAN_COMMAND_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "tools/internal/kvplan_json.h"

namespace kvx::kvplan_internal {

struct Command {
  absl::string_view name;
  // The command's paragraph of `kvplan --help`: what it does, its input and output.
  absl::string_view usage;
  // Runs the command on a parsed input. Errors: see tools/kvplan.h.
  absl::StatusOr<ordered_json> (*run)(const json& input);
};

extern const Command kAlignCommand;      // tools/kvplan_align.cc
extern const Command kPairCommand;       // tools/kvplan_pair.cc
extern const Command kSliceCommand;      // tools/kvplan_slice.cc
extern const Command kTransferCommand;   // tools/kvplan_transfer.cc
extern const Command kFragmentsCommand;  // tools/kvplan_fragments.cc

}  // namespace kvx::kvplan_internal

#endif  // KVX_TOOLS_INTERNAL_KVPLAN_COMMAND_H_
