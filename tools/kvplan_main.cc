// kvplan: explains a KV-cache transfer. JSON in (a file or stdin), JSON out
// (stdout); on rejected input exit 1 with one line on stderr and nothing on stdout.
// The process contract is tools/kvplan_cli.h; the commands are tools/kvplan.h.
//
// kvplan defines no flags and does not call absl::ParseCommandLine: Abseil's
// built-in flags would read files (--flagfile), exit 0 silently
// (--only_check_args) or print pages of flag help (--helpon), none of it the
// contract; RunCli answers every "-..." argument itself.

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tools/kvplan_cli.h"

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  const char* working_dir = std::getenv("BUILD_WORKING_DIRECTORY");
  const kvx::kvplan::CliResult result =
      kvx::kvplan::RunCli(args, stdin, working_dir == nullptr ? "" : working_dir);
  std::fwrite(result.err.data(), 1, result.err.size(), stderr);
  if (std::fwrite(result.out.data(), 1, result.out.size(), stdout) != result.out.size() ||
      std::fflush(stdout) != 0) {
    std::fputs("kvplan: cannot write stdout\n", stderr);
    return 1;
  }
  return result.exit_code;
}
