// libFuzzer target for kvplan's input: the first line of the fuzz input is the one
// command-line argument (a command, or anything else), the rest is stdin. Every
// input must keep the process contract of tools/kvplan_cli.h, checked here:
//   - exit 0: stdout is one line holding one JSON document (or the usage, for a
//     help flag), stderr empty;
//   - exit 1: stdout empty, stderr exactly one line "kvplan: ...\n" of printable
//     ASCII, at most 1 KiB, and the error is not a kvplan bug (kInternal);
// and no crash or sanitizer report; libFuzzer's -timeout and -rss_limit_mb bound
// the time and memory of one run. A broken contract aborts with the reason.
//
//   bazel build --config=fuzz //tools:kvplan_fuzzer
//   bazel-bin/tools/kvplan_fuzzer -dict=tools/kvplan_fuzzer.dict -timeout=5
//       -rss_limit_mb=1024 -max_total_time=60 /tmp/corpus tools/kvplan_fuzzer_corpus
//   (one command line)
//
// Seeds (tools/kvplan_fuzzer_corpus): the two examples and a minimal input per
// command, each "<command>\n<json>".

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "tools/kvplan_cli.h"

namespace {

[[noreturn]] void Broken(const char* what, const kvx::kvplan::CliResult& result) {
  std::fprintf(stderr, "kvplan contract broken: %s\nexit=%d code=%d\nstdout (%zu bytes): %.2000s\n"
               "stderr (%zu bytes): %.2000s\n",
               what, result.exit_code, static_cast<int>(result.code), result.out.size(),
               result.out.c_str(), result.err.size(), result.err.c_str());
  std::abort();
}

void CheckContract(const kvx::kvplan::CliResult& result) {
  if (result.exit_code == 0) {
    if (!result.err.empty()) Broken("exit 0 with stderr", result);
    if (absl::StartsWith(result.out, "kvplan: explains")) return;  // a help flag
    if (result.out.empty() || result.out.back() != '\n' ||
        result.out.find('\n') != result.out.size() - 1) {
      Broken("exit 0 without exactly one line on stdout", result);
    }
    if (!nlohmann::json::accept(result.out)) Broken("stdout is not one JSON document", result);
    return;
  }
  if (result.exit_code != 1) Broken("exit code neither 0 nor 1", result);
  if (!result.out.empty()) Broken("exit 1 with stdout", result);
  if (!absl::StartsWith(result.err, "kvplan: ") || result.err.back() != '\n' ||
      result.err.size() > 1200) {
    Broken("stderr is not one 'kvplan: ' line of at most 1 KiB", result);
  }
  for (size_t i = 0; i + 1 < result.err.size(); ++i) {
    const char c = result.err[i];
    if (c < 0x20 || c > 0x7e) Broken("stderr holds a byte that is not printable ASCII", result);
  }
  if (result.code == absl::StatusCode::kInternal) Broken("a kvplan bug (kInternal)", result);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t newline = input.find('\n');
  const std::string arg(input.substr(0, newline));
  std::string body(newline == absl::string_view::npos ? "" : input.substr(newline + 1));
  std::FILE* stdin_file = fmemopen(body.data(), body.size(), "rb");
  if (stdin_file == nullptr) std::abort();
  const kvx::kvplan::CliResult result = kvx::kvplan::RunCli({arg}, stdin_file, "");
  std::fclose(stdin_file);
  CheckContract(result);
  return 0;
}
