// File: transfer/control_security.h
//
// Who may talk to a rank's control channel (transfer/control_channel.h): off (any
// process that reaches the port, the one-machine default), or CurveZMQ, ZeroMQ's
// built-in CURVE mechanism: every connection is encrypted, each side proves it holds
// the secret key of its public key, and a rank accepts connections only from the
// public keys in its allowlist, each tied to the name of a peer instance. Keys are
// Z85 text, 40 characters, as zmq_curve_keypair() makes them; the files that hold
// them are transfer/curve_key_files.h. transfer/CONTROL_PLANE.md is the whole story.
//
//   kvx::transfer::ControlSecurity security;
//   security.mode = kvx::transfer::ControlSecurity::Mode::kCurve;
//   security.keys = *kvx::transfer::GenerateCurveKeyPair();   // or from files
//   security.peers["prefill-0"] = prefill_public_key;          // Z85
//   absl::Status valid = kvx::transfer::ValidateControlSecurity(security);
//
// Thread safety: plain values and pure functions.

#ifndef KVX_TRANSFER_CONTROL_SECURITY_H_
#define KVX_TRANSFER_CONTROL_SECURITY_H_

#include <cstddef>
#include <map>
#include <string>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvx::transfer {

// A CURVE key in Z85 text is 40 characters for 32 bytes.
inline constexpr size_t kCurveKeyZ85Chars = 40;
// Peer instance names are the ZAP user id of a connection: 1..255 printable bytes.
inline constexpr size_t kMaxPeerInstanceName = 255;

struct CurveKeyPair {
  std::string public_key;  // Z85, 40 characters
  std::string secret_key;  // Z85, 40 characters; never logged
};

struct ControlSecurity {
  enum class Mode {
    kOff,    // no authentication, no encryption: ZeroMQ's NULL mechanism
    kCurve,  // CurveZMQ with `keys` and the `peers` allowlist
  };
  Mode mode = Mode::kOff;
  // kCurve: this rank's keypair (its instance's, shared by the instance's ranks).
  CurveKeyPair keys;
  // kCurve: the allowlist. Peer instance name -> its Z85 public key. A connection
  // is accepted only from a client proving one of these keys, and is then known as
  // that instance; a rank sends only to an address tied to one of these instances
  // (ControlChannel::SetPeerInstance). Two names may not share a key.
  std::map<std::string, std::string> peers;
};

// Checks `key` is 40 Z85 characters that decode to 32 bytes and encode back to
// themselves (one text per key, so that the allowlist compares keys by text).
// `what` names the key in the error. Errors: InvalidArgument.
ABSL_MUST_USE_RESULT absl::Status ValidateCurveKey(absl::string_view key,
                                                   absl::string_view what);

// OK for kOff whatever the other fields hold (they are ignored). For kCurve: both
// keys valid, the public key the one the secret key derives, at least one peer,
// peer names 1..255 printable bytes, peer keys valid and distinct, and none equal
// to this rank's own public key. Errors: InvalidArgument naming the field.
ABSL_MUST_USE_RESULT absl::Status ValidateControlSecurity(const ControlSecurity& security);

// A fresh keypair from the system's randomness (libsodium). Errors: Unimplemented
// when this libzmq was built without CURVE; Internal otherwise.
ABSL_MUST_USE_RESULT absl::StatusOr<CurveKeyPair> GenerateCurveKeyPair();

// True when libzmq supports CURVE (zmq_has("curve")).
bool CurveAvailable();

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_CONTROL_SECURITY_H_
