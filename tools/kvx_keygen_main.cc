// kvx_keygen: writes a CurveZMQ keypair for one instance's control plane
// (transfer/CONTROL_PLANE.md): NAME.secret (mode 0600) and NAME.pub in --out_dir,
// never replacing a key. Copy NAME.pub into the key directory of every peer
// instance that is to accept NAME; NAME.secret stays on NAME's machines.
//
//   bazel run //tools:kvx_keygen -- --out_dir=/etc/kvx/keys --name=decode-0
//
// Prints {"name", "public_key", "public_key_file", "secret_key_file"} as JSON on
// stdout; on error one line on stderr and exit 1. A relative --out_dir is relative
// to the directory `bazel run` was started from.

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "transfer/control_security.h"
#include "transfer/curve_key_files.h"

ABSL_FLAG(std::string, out_dir, "", "existing directory to write NAME.pub and NAME.secret in");
ABSL_FLAG(std::string, name, "",
          "the instance the keys are for (its TransceiverOptions.instance)");

namespace {

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvx_keygen: %s\n", status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "writes a CurveZMQ keypair for the kvx control plane: NAME.secret (0600) and "
      "NAME.pub\n"
      "  bazel run //tools:kvx_keygen -- --out_dir=/etc/kvx/keys --name=decode-0\n"
      "  bazel run //tools:kvx_keygen -- --out_dir=keys --name=prefill-0");
  absl::ParseCommandLine(argc, argv);
  const std::string name = absl::GetFlag(FLAGS_name);
  std::string dir = absl::GetFlag(FLAGS_out_dir);
  if (dir.empty() || name.empty()) {
    return Fail(absl::InvalidArgumentError("--out_dir and --name are required"));
  }
  // `bazel run` starts the tool in its runfiles: a relative path means the user's.
  const char* working_dir = std::getenv("BUILD_WORKING_DIRECTORY");
  if (!absl::StartsWith(dir, "/") && working_dir != nullptr) {
    dir = absl::StrCat(working_dir, "/", dir);
  }
  absl::StatusOr<kvx::transfer::CurveKeyPair> keys = kvx::transfer::GenerateCurveKeyPair();
  if (!keys.ok()) return Fail(keys.status());
  if (absl::Status written = kvx::transfer::WriteCurveKeyPair(dir, name, *keys);
      !written.ok()) {
    return Fail(written);
  }
  nlohmann::json out;
  out["name"] = name;
  out["public_key"] = keys->public_key;
  out["public_key_file"] = absl::StrCat(dir, "/", name, kvx::transfer::kCurvePublicKeySuffix);
  out["secret_key_file"] = absl::StrCat(dir, "/", name, kvx::transfer::kCurveSecretKeySuffix);
  const std::string text = out.dump(2) + "\n";
  if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size() ||
      std::fflush(stdout) != 0) {
    std::fputs("kvx_keygen: cannot write stdout\n", stderr);
    return 1;
  }
  return 0;
}
