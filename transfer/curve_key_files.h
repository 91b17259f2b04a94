// File: transfer/curve_key_files.h
//
// CurveZMQ keys of the control plane (transfer/control_security.h) in files, the way
// ssh keeps them: an instance NAME has `NAME.secret` (readable by its owner only)
// and `NAME.pub`. A key directory holds this instance's pair and the `.pub` file of
// every peer instance it accepts: those are the allowlist, each tied to the name
// its file carries. `bazel run //tools:kvx_keygen -- --out_dir=DIR --name=NAME`
// writes a pair; transfer/CONTROL_PLANE.md shows a whole setup.
//
//   absl::StatusOr<kvx::transfer::ControlSecurity> security =
//       kvx::transfer::LoadCurveSecurity("/etc/kvx/keys", "decode-0");
//   // reads decode-0.secret and decode-0.pub; every other *.pub is a peer
//
// File format: the 40 Z85 characters of the key on one line, as zmq_curve_keypair
// makes them; blank lines and lines starting with '#' (which no Z85 key does) are
// ignored; at most 4096 bytes.
//
// Thread safety: functions of the file system only.

#ifndef KVX_TRANSFER_CURVE_KEY_FILES_H_
#define KVX_TRANSFER_CURVE_KEY_FILES_H_

#include <string>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "transfer/control_security.h"

namespace kvx::transfer {

inline constexpr absl::string_view kCurvePublicKeySuffix = ".pub";
inline constexpr absl::string_view kCurveSecretKeySuffix = ".secret";

// Reads one key file. Errors: NotFound when it does not exist; InvalidArgument
// when it is not a regular file, is too long, or holds no key, two keys or a
// malformed one; Internal for another I/O failure. Messages name the path.
ABSL_MUST_USE_RESULT absl::StatusOr<std::string> ReadCurvePublicKeyFile(
    absl::string_view path);

// As ReadCurvePublicKeyFile, and first FailedPrecondition when the file grants any
// permission to group or others (it must be chmod 600 or 400: a secret key others
// can read is no secret).
ABSL_MUST_USE_RESULT absl::StatusOr<std::string> ReadCurveSecretKeyFile(
    absl::string_view path);

// Mode kCurve with `instance`'s keypair from `key_dir` and every other `*.pub` in
// it as the allowlist (at most 4096 files), validated (ValidateControlSecurity).
// Other files are ignored. Errors: InvalidArgument for an instance name that is
// not a file name (empty, '/', ".", ".."); the readers' errors; NotFound when
// `key_dir` cannot be listed; ValidateControlSecurity's (an empty allowlist, a key
// pair that does not match).
ABSL_MUST_USE_RESULT absl::StatusOr<ControlSecurity> LoadCurveSecurity(
    absl::string_view key_dir, absl::string_view instance);

// Writes `keys` as `name`.pub (mode 0644) and `name`.secret (mode 0600) in
// `dir`, which must exist. Never replaces a file. Errors: AlreadyExists when either
// file exists (nothing is written); InvalidArgument for a bad name or key;
// NotFound/Internal from the file system (a half-written pair is removed).
ABSL_MUST_USE_RESULT absl::Status WriteCurveKeyPair(absl::string_view dir,
                                                    absl::string_view name,
                                                    const CurveKeyPair& keys);

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_CURVE_KEY_FILES_H_
