// kvplan: explains a KV-cache transfer. JSON in (a file or stdin), JSON out
// (stdout); on rejected input exit 1 with one line on stderr and nothing on stdout.
// The logic is tools/kvplan.h; this file reads, prints and documents.

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "tools/kvplan.h"

namespace {

constexpr char kUsage[] = R"(explains what a KV-cache transfer moves, and why.

Usage: kvplan <command> [file]      (no file or "-": read stdin)
       kvplan --help
Reads one JSON object, prints one line of JSON on stdout and exits 0. On rejected
input it exits 1 with a one-line reason on stderr (naming the offending field) and
prints nothing on stdout. Unknown fields and fields given twice are rejected (a
typo never becomes a default); an optional field given as null counts as absent. Integers only (no 8.0,
no "8"); token counts and positions are 0 <= n <= 2^53-1, tokens_per_block >= 1,
block ids >= 0. token_range is [start, end] with 0 <= start < end; in slice and
transfer also end <= prompt_len. Semantics: SEMANTICS.md sections 2-6.

Commands:
  align     Pairs two block lists by the tokens they cover (section 5 step 7).
            in:  {"tokens_per_block", "src": [ids], "dst": [ids],
                  "src_start_token", "dst_start_token"}        (all required)
            out: {"src": [ids], "dst": [ids]}   src[i] is written into dst[i]

  pair      Pairs a send slice with the receiver's suffix lists, per layer group
            (section 5).
            in:  {"tokens_per_block", "prompt_len", "token_range"?: [s, e],
                  "windows": [null | W, ...], "src": [[ids], ...],
                  "dst": [[ids], ...], "dst_start_token"?: n}
            token_range defaults to [0, prompt_len) (none when prompt_len is 0,
            slice end 0). src, dst and windows list the same number of groups.
            A list one block longer than its suffix loses its last (draft) id;
            longer by more is an error.
            out: {"groups": [{"src_start_token", "dst_start_token",
                              "src": [ids], "dst": [ids]}, ...]}
            the starts are where each given list starts (after the dst hint);
            src/dst are the paired ids that move.

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

  transfer  Both sides of one request: what moves, what is skipped, and why.
            in:  {"tokens_per_block", "prompt_len", "token_range"?,
                  "dst_start_token"?, "context": {slice input},
                  "generation": {slice input}}
            Each side is a slice input without "side" (or with the matching one);
            its tokens_per_block, prompt_len and token_range may be left out and
            must agree when present; both sides list the same groups with the
            same windows. The generation side may carry dst_start_token instead of
            the top level (both: must agree).
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

  fragments The byte ranges one request moves between every (context rank,
            generation rank) pair, before and after coalescing (sections 4-6).
            Every rank uses the standard layout of transfer/scenario.h: one pool
            per model group, a slot holds the rank's layers of the group, each K
            then V (MLA: the latent), each [head][token-in-block][dim].
            in:  {"model": {"num_layers", "num_kv_heads", "head_size",
                            "element_bytes", "tokens_per_block", "mla"?: bool,
                            "groups"?: [{"window"?: null | W,
                                         "layers"?: [increasing layer ids]}]},
                  "request": {"prompt_len", "token_range"?},
                  "context": {side}, "generation": {side},
                  "max_fragments_listed"?: n}
            model.groups defaults to one full-attention group of every layer;
            "layers" may be left out only by a single group.
            side: {"tp", "pp_layers"?: [layers per PP stage] (default all on one),
                   "attention_dp"?: bool, "dp_rank"?: n (default 0; the request's
                   rank when attention_dp), "num_slots"?: n (default: the largest
                   block id of the side's slice + 1), "generation_only"?,
                   "reuse"?, "groups"?: [{"window"?, "block_ids": [ids]}, ...]}
            reuse and groups are those of a slice input: positional tables, one per
            model group (a window, if given, must be the model's); groups absent:
            identity tables 0..cdiv(end, tpb)-1. Each side's slice is built as in
            transfer (the generation side with its reuse), then paired and planned.
            out: {"pairs": [{"context_rank", "generation_rank",
                             "writes": false for a replica that only reports,
                             "fragments_before_coalescing",
                             "fragments_after_coalescing",
                             "fragments": [{"src_pool", "src_offset", "dst_pool",
                                            "dst_offset", "bytes"}, ...],
                             "bytes"}, ...],
                  "totals": {"rank_pairs", "fragments_before_coalescing",
                             "fragments_after_coalescing", "bytes"},
                  "block_ids": {"context": [[...]], "generation": [[...]]},
                  "cached_tokens": {"context": [...], "generation": [...]}}
            Ranks are pp_rank * tp + tp_rank; offsets are bytes from the start
            of the pool. max_fragments_listed caps each pair's "fragments" list
            (counts and bytes still cover all); absent: every fragment.
            Bounds: num_layers <= 65536, tp <= 4096, tp x stages <= 65536,
            default identity tables <= 2^20 blocks.

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

int Fail(absl::string_view message) {
  std::cerr << "kvplan: " << message << std::endl;
  return 1;
}

// Reads all of `path` ("-": stdin) into `text`; false with errno set on failure.
bool ReadAll(const std::string& path, std::string* text) {
  FILE* file = path == "-" ? stdin : std::fopen(path.c_str(), "rb");
  if (file == nullptr) return false;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0) text->append(buffer, n);
  const bool ok = !std::ferror(file);
  const int saved_errno = errno;
  if (file != stdin) std::fclose(file);
  errno = saved_errno;
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // Abseil's --help exits 1 after listing flags; ours is the documentation and
  // exits 0.
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg == "--help" || arg == "-help" || arg == "-h" || arg == "--helpfull" ||
        arg == "--helpshort") {
      std::cout << "kvplan: " << kUsage << std::endl;
      return 0;
    }
  }
  // Abseil would read "-" (stdin) as a flag; hide it from the parser.
  std::vector<char*> to_parse;
  std::vector<int> stdin_positions;
  for (int i = 0; i < argc; ++i) {
    if (absl::string_view(argv[i]) == "-") {
      stdin_positions.push_back(i);
      continue;
    }
    to_parse.push_back(argv[i]);
  }
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(to_parse.size()), to_parse.data());
  for (size_t i = 0; i < stdin_positions.size(); ++i) args.push_back(const_cast<char*>("-"));

  if (args.size() < 2) return Fail("missing command (try kvplan --help)");
  const std::string command = args[1];
  if (!kvx::kvplan::IsCommand(command)) {
    return Fail(absl::StrCat("unknown command: ", command,
                             " (expected align, pair, slice, transfer or fragments; try --help)"));
  }
  if (args.size() > 3) {
    return Fail(absl::StrCat(command, ": too many arguments (expected at most one file)"));
  }
  std::string path = args.size() == 3 ? args[2] : "-";
  // `bazel run` starts the tool in its runfiles; a relative path means the
  // directory the user ran bazel from.
  const char* working_dir = std::getenv("BUILD_WORKING_DIRECTORY");
  if (path != "-" && path[0] != '/' && working_dir != nullptr && *working_dir != '\0') {
    path = absl::StrCat(working_dir, "/", path);
  }
  std::string input;
  if (!ReadAll(path, &input)) {
    return Fail(absl::StrCat(command, ": cannot read ", path == "-" ? "stdin" : path, ": ",
                             std::strerror(errno)));
  }
  absl::StatusOr<std::string> output = kvx::kvplan::RunCommand(command, input);
  if (!output.ok()) return Fail(absl::StrCat(command, ": ", output.status().message()));
  std::cout << *output << std::flush;
  return std::cout.good() ? 0 : Fail(absl::StrCat(command, ": cannot write stdout"));
}
