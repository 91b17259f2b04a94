// File: tools/kvplan_cli.h
//
// The kvplan process as a function: arguments and stdin in; exit code, stdout and
// stderr out. tools/kvplan_main.cc hands it argv and prints what it returns; the
// fuzzer (tools/kvplan_fuzzer.cc) holds every input to the contract below.
//
// Contract: exit 0 with one line of JSON on stdout and nothing on stderr; or exit 1
// with nothing on stdout and exactly one line on stderr, "kvplan: <reason>\n", of
// printable ASCII (input text in it escaped and cut). `--help` and every other
// spelling that starts with -h or --help (Abseil's --helpfull, --helpon=...,
// --helpmatch=...) print the usage on stdout and exit 0. kvplan takes no flags:
// any other argument that starts with "-" (--only_check_args, --flagfile=...) is
// rejected, "--" ends the options and "-" alone is stdin.
//
//   CliResult r = RunCli({"align", "in.json"}, stdin, "");
//   fwrite(r.out.data(), 1, r.out.size(), stdout);
//
// Thread safety: RunCli reads `stdin_file` and the named file; otherwise pure.

#ifndef KVX_TOOLS_KVPLAN_CLI_H_
#define KVX_TOOLS_KVPLAN_CLI_H_

#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvx::kvplan {

struct CliResult {
  int exit_code = 0;
  std::string out;  // what goes to stdout
  std::string err;  // what goes to stderr
  // The error behind exit 1 (kOk otherwise): tests and the fuzzer tell a kvplan bug
  // (kInternal) from rejected input.
  absl::StatusCode code = absl::StatusCode::kOk;
};

// Runs kvplan with `args` (argv without the program name). The input is the named
// file, or `stdin_file` for none or "-"; a relative file name resolves against
// `working_dir` when it is not empty (bazel run's BUILD_WORKING_DIRECTORY). Input
// past 16 MiB is refused after reading one byte more than that.
CliResult RunCli(const std::vector<std::string>& args, std::FILE* stdin_file,
                 absl::string_view working_dir);

}  // namespace kvx::kvplan

#endif  // KVX_TOOLS_KVPLAN_CLI_H_
