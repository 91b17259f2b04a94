#include "transfer/control_security.h"

#include <cerrno>
#include <cstdint>
#include <cstring>  // explicit_bzero (glibc)
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "zmq.h"

namespace kvx::transfer {
namespace {

constexpr size_t kCurveKeyBytes = 32;

bool Printable(absl::string_view s) {
  for (char c : s) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

}  // namespace

bool CurveAvailable() { return zmq_has("curve") == 1; }

absl::Status ValidateCurveKey(absl::string_view key, absl::string_view what) {
  // The key itself never goes into the message: it may be a secret key.
  if (key.size() != kCurveKeyZ85Chars) {
    return absl::InvalidArgumentError(absl::StrCat("curve key is not 40 z85 characters: key=",
                                                   what, " chars=", key.size()));
  }
  const std::string text(key);  // zmq_z85_decode reads a NUL-terminated string
  uint8_t bytes[kCurveKeyBytes];
  char again[kCurveKeyZ85Chars + 1];
  // zmq_z85_decode rejects characters outside the alphabet; a group of five that
  // overflows 32 bits would decode to a key whose encoding differs, so the round
  // trip catches it.
  if (zmq_z85_decode(bytes, text.c_str()) == nullptr ||
      zmq_z85_encode(again, bytes, kCurveKeyBytes) == nullptr || text != again) {
    return absl::InvalidArgumentError(
        absl::StrCat("curve key is not valid z85: key=", what));
  }
  return absl::OkStatus();
}

absl::Status ValidateControlSecurity(const ControlSecurity& security) {
  if (security.mode == ControlSecurity::Mode::kOff) return absl::OkStatus();
  if (!CurveAvailable()) {
    return absl::UnimplementedError("this libzmq is built without CURVE: zmq_has(\"curve\")=0");
  }
  if (absl::Status s = ValidateCurveKey(security.keys.public_key, "own public"); !s.ok()) {
    return s;
  }
  if (absl::Status s = ValidateCurveKey(security.keys.secret_key, "own secret"); !s.ok()) {
    return s;
  }
  char derived[kCurveKeyZ85Chars + 1];
  if (zmq_curve_public(derived, security.keys.secret_key.c_str()) != 0 ||
      security.keys.public_key != derived) {
    return absl::InvalidArgumentError(
        "own public key is not the one the secret key derives (keys from two pairs?)");
  }
  if (security.peers.empty()) {
    return absl::InvalidArgumentError(
        "curve allowlist is empty: no peer instance could ever connect");
  }
  std::map<std::string, std::string> names_by_key;
  for (const auto& [name, key] : security.peers) {
    if (name.empty() || name.size() > kMaxPeerInstanceName || !Printable(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "peer instance name must be 1..255 printable bytes: size=", name.size()));
    }
    if (absl::Status s = ValidateCurveKey(key, absl::StrCat("peer ", name)); !s.ok()) {
      return s;
    }
    if (key == security.keys.public_key) {
      return absl::InvalidArgumentError(absl::StrCat(
          "peer instance has this rank's own public key: peer=", name));
    }
    auto [it, inserted] = names_by_key.emplace(key, name);
    if (!inserted) {
      // One key, two names: the user id of a connection would be ambiguous.
      return absl::InvalidArgumentError(absl::StrCat(
          "two peer instances share a public key: peer=", it->second, " peer=", name));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CurveKeyPair> GenerateCurveKeyPair() {
  char public_key[kCurveKeyZ85Chars + 1];
  char secret_key[kCurveKeyZ85Chars + 1];
  if (zmq_curve_keypair(public_key, secret_key) != 0) {
    const int error = zmq_errno();
    if (error == ENOTSUP) {
      return absl::UnimplementedError(
          "this libzmq is built without CURVE: zmq_curve_keypair failed: errno=ENOTSUP");
    }
    return absl::InternalError(absl::StrCat("zmq_curve_keypair failed: errno=", error,
                                            " error=", zmq_strerror(error)));
  }
  CurveKeyPair pair{public_key, secret_key};
  // Wipe the stack copy (explicit_bzero: a plain memset of a dead buffer may be
  // optimized away); the caller owns the only one left.
  explicit_bzero(secret_key, sizeof(secret_key));
  return pair;
}

}  // namespace kvx::transfer
