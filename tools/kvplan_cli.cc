#include "tools/kvplan_cli.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "tools/internal/kvplan_json.h"
#include "tools/kvplan.h"

namespace kvx::kvplan {
namespace {

using kvplan_internal::Escape;
using kvplan_internal::kMaxInputBytes;

CliResult Fail(absl::StatusCode code, absl::string_view reason) {
  CliResult result;
  result.exit_code = 1;
  result.code = code;
  result.err = absl::StrCat("kvplan: ", kvplan_internal::OneLine(reason), "\n");
  return result;
}

// Abseil's help flags, and ours: -h, -help, --help, --helpfull, --helpon=x, ...
bool IsHelp(absl::string_view arg) {
  absl::string_view name = arg.substr(0, arg.find('='));
  if (!absl::ConsumePrefix(&name, "--")) absl::ConsumePrefix(&name, "-");
  return name == "h" || absl::StartsWith(name, "help");
}

// Reads `file` to its end, or up to one byte past kMaxInputBytes.
absl::StatusOr<std::string> ReadBounded(std::FILE* file, absl::string_view name) {
  std::string text;
  char buffer[1 << 16];
  size_t n = 0;
  while (text.size() <= kMaxInputBytes &&
         (n = std::fread(buffer, 1, sizeof(buffer), file)) > 0) {
    text.append(buffer, n);
  }
  if (std::ferror(file)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read ", name, ": ", std::strerror(errno)));
  }
  if (text.size() > kMaxInputBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("input larger than max_bytes=", kMaxInputBytes, ": ", name));
  }
  return text;
}

absl::StatusOr<std::string> ReadInput(const std::string& path, std::FILE* stdin_file,
                                      absl::string_view working_dir) {
  if (path == "-") return ReadBounded(stdin_file, "stdin");
  // `bazel run` starts the tool in its runfiles; a relative path means the
  // directory the user ran bazel from.
  const std::string full = path[0] != '/' && !working_dir.empty()
                               ? absl::StrCat(working_dir, "/", path)
                               : path;
  std::FILE* file = std::fopen(full.c_str(), "rb");
  if (file == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read ", Escape(full, 256), ": ", std::strerror(errno)));
  }
  absl::StatusOr<std::string> text = ReadBounded(file, Escape(full, 256));
  std::fclose(file);
  return text;
}

}  // namespace

CliResult RunCli(const std::vector<std::string>& args, std::FILE* stdin_file,
                 absl::string_view working_dir) {
  std::vector<std::string> positional;
  bool options_ended = false;
  for (const std::string& arg : args) {
    if (options_ended || arg == "-" || arg.empty() || arg[0] != '-') {
      positional.push_back(arg);
    } else if (arg == "--") {
      options_ended = true;
    } else if (IsHelp(arg)) {
      CliResult help;
      help.out = absl::StrCat("kvplan: ", Usage(), "\n");
      return help;
    } else {
      return Fail(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("unknown flag: ", Escape(arg),
                               " (kvplan takes none; try --help)"));
    }
  }
  if (positional.empty()) {
    return Fail(absl::StatusCode::kInvalidArgument, "missing command (try kvplan --help)");
  }
  const std::string& command = positional[0];
  if (!IsCommand(command)) {
    return Fail(absl::StatusCode::kInvalidArgument,
                absl::StrCat("unknown command: ", Escape(command),
                             " (expected align, pair, slice, transfer or fragments; try --help)"));
  }
  if (positional.size() > 2) {
    return Fail(absl::StatusCode::kInvalidArgument,
                absl::StrCat(command, ": too many arguments (expected at most one file)"));
  }
  const std::string path = positional.size() == 2 ? positional[1] : "-";
  absl::StatusOr<std::string> input =
      path.empty() ? absl::InvalidArgumentError("cannot read an empty file name")
                   : ReadInput(path, stdin_file, working_dir);
  if (!input.ok()) {
    return Fail(input.status().code(), absl::StrCat(command, ": ", input.status().message()));
  }
  absl::StatusOr<std::string> output = RunCommand(command, *input);
  if (!output.ok()) {
    return Fail(output.status().code(), absl::StrCat(command, ": ", output.status().message()));
  }
  CliResult result;
  result.out = *std::move(output);
  return result;
}

}  // namespace kvx::kvplan
