#include "transfer/curve_key_files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "transfer/control_security.h"

namespace kvx::transfer {
namespace {

constexpr size_t kMaxKeyFileBytes = 4096;
constexpr size_t kMaxKeyDirEntries = 4096;

absl::Status ErrnoStatus(absl::string_view what, absl::string_view path, int error) {
  const absl::StatusCode code =
      error == ENOENT || error == ENOTDIR ? absl::StatusCode::kNotFound
      : error == EEXIST                   ? absl::StatusCode::kAlreadyExists
                                          : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": path=", path, " errno=", error,
                                         " error=", std::strerror(error)));
}

// Closes a descriptor on every path out.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

std::string Octal(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof(text), "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

absl::StatusOr<std::string> ReadKeyFile(absl::string_view path, bool secret) {
  const std::string p(path);
  Fd file{open(p.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) return ErrnoStatus("cannot open curve key file", path, errno);
  // fstat of the open file, not stat of the name: what is checked is what is read
  // (a symlink, as secret mounts use, is checked at its target).
  struct stat st;
  if (fstat(file.fd, &st) != 0) return ErrnoStatus("cannot stat curve key file", path, errno);
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("curve key file is not a regular file: path=", path));
  }
  if (secret && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("secret key file is open to group or others (chmod 600 it): path=", path,
                     " mode=", Octal(st.st_mode)));
  }
  std::string text(kMaxKeyFileBytes + 1, '\0');
  size_t size = 0;
  while (size < text.size()) {
    const ssize_t n = read(file.fd, text.data() + size, text.size() - size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus("cannot read curve key file", path, errno);
    if (n == 0) break;
    size += static_cast<size_t>(n);
  }
  if (size > kMaxKeyFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "curve key file is too long: path=", path, " max_bytes=", kMaxKeyFileBytes));
  }
  text.resize(size);
  std::string key;
  int keys = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    // '#' is a Z85 digit, but digit 84, and the first digit of a group is at most
    // 82 (85^5 > 2^32): no key starts with '#'.
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    if (++keys == 1) key = std::string(line);
  }
  // The text read holds the secret key: wipe what is not returned.
  std::fill(text.begin(), text.end(), '\0');
  if (keys != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "curve key file must hold exactly one key line: path=", path, " keys=", keys));
  }
  if (absl::Status valid = ValidateCurveKey(key, path); !valid.ok()) return valid;
  return key;
}

// A name that is one printable file name: no directory part, no line break that
// would put a second line into a key file's comment.
absl::Status CheckFileName(absl::string_view name) {
  const bool printable = std::all_of(name.begin(), name.end(),
                                     [](char c) { return c >= 0x20 && c <= 0x7e; });
  if (name.empty() || name.size() > kMaxPeerInstanceName || !printable || name == "." ||
      name == ".." || absl::StrContains(name, '/')) {
    return absl::InvalidArgumentError(absl::StrCat(
        "instance name cannot name a key file (1..255 printable bytes, no '/', not \".\" or "
        "\"..\"): name=", absl::CHexEscape(name), " size=", name.size()));
  }
  return absl::OkStatus();
}

std::string PathOf(absl::string_view dir, absl::string_view name, absl::string_view suffix) {
  return absl::StrCat(dir, absl::EndsWith(dir, "/") || dir.empty() ? "" : "/", name, suffix);
}

// Writes `text` to a new file `path` with `mode`; removes it again on failure.
absl::Status WriteNewFile(const std::string& path, absl::string_view text, mode_t mode) {
  Fd file{open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)};
  if (file.fd < 0) return ErrnoStatus("cannot create curve key file", path, errno);
  absl::Status status;
  // The umask can only take bits away; fchmod makes the mode exactly `mode`.
  if (fchmod(file.fd, mode) != 0) status = ErrnoStatus("cannot chmod curve key file", path, errno);
  for (size_t done = 0; status.ok() && done < text.size();) {
    const ssize_t n = write(file.fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = ErrnoStatus("cannot write curve key file", path, errno);
    } else {
      done += static_cast<size_t>(n);
    }
  }
  if (status.ok() && fsync(file.fd) != 0) {
    status = ErrnoStatus("cannot sync curve key file", path, errno);
  }
  if (!status.ok()) unlink(path.c_str());
  return status;
}

}  // namespace

absl::StatusOr<std::string> ReadCurvePublicKeyFile(absl::string_view path) {
  return ReadKeyFile(path, /*secret=*/false);
}

absl::StatusOr<std::string> ReadCurveSecretKeyFile(absl::string_view path) {
  return ReadKeyFile(path, /*secret=*/true);
}

absl::StatusOr<ControlSecurity> LoadCurveSecurity(absl::string_view key_dir,
                                                  absl::string_view instance) {
  if (absl::Status s = CheckFileName(instance); !s.ok()) return s;
  ControlSecurity security;
  security.mode = ControlSecurity::Mode::kCurve;
  absl::StatusOr<std::string> secret =
      ReadCurveSecretKeyFile(PathOf(key_dir, instance, kCurveSecretKeySuffix));
  if (!secret.ok()) return secret.status();
  security.keys.secret_key = *std::move(secret);
  absl::StatusOr<std::string> own =
      ReadCurvePublicKeyFile(PathOf(key_dir, instance, kCurvePublicKeySuffix));
  if (!own.ok()) return own.status();
  security.keys.public_key = *std::move(own);

  const std::string dir(key_dir);
  std::unique_ptr<DIR, int (*)(DIR*)> listing(opendir(dir.c_str()), &closedir);
  if (listing == nullptr) return ErrnoStatus("cannot list curve key directory", dir, errno);
  std::vector<std::string> names;
  size_t entries = 0;
  while (const dirent* entry = readdir(listing.get())) {
    if (++entries > kMaxKeyDirEntries) {
      return absl::InvalidArgumentError(absl::StrCat(
          "curve key directory has too many entries: path=", dir, " max=", kMaxKeyDirEntries));
    }
    absl::string_view file = entry->d_name;
    if (!absl::ConsumeSuffix(&file, kCurvePublicKeySuffix) || file.empty() ||
        file == instance) {
      continue;
    }
    names.emplace_back(file);
  }
  // Sorted, so that an error names the same file on every machine.
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    absl::StatusOr<std::string> key =
        ReadCurvePublicKeyFile(PathOf(key_dir, name, kCurvePublicKeySuffix));
    if (!key.ok()) return key.status();
    security.peers[name] = *std::move(key);
  }
  if (absl::Status valid = ValidateControlSecurity(security); !valid.ok()) {
    return absl::Status(valid.code(),
                        absl::StrCat(valid.message(), ": key_dir=", key_dir,
                                     " instance=", instance));
  }
  return security;
}

absl::Status WriteCurveKeyPair(absl::string_view dir, absl::string_view name,
                               const CurveKeyPair& keys) {
  if (absl::Status s = CheckFileName(name); !s.ok()) return s;
  if (absl::Status s = ValidateCurveKey(keys.public_key, "public"); !s.ok()) return s;
  if (absl::Status s = ValidateCurveKey(keys.secret_key, "secret"); !s.ok()) return s;
  const std::string public_path = PathOf(dir, name, kCurvePublicKeySuffix);
  const std::string secret_path = PathOf(dir, name, kCurveSecretKeySuffix);
  for (const std::string& path : {public_path, secret_path}) {
    struct stat st;
    if (lstat(path.c_str(), &st) == 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("curve key file exists (never replaced): path=", path));
    }
  }
  // The secret first: a pair is usable only once both exist, and a crash between
  // the two leaves a secret no one can mistake for a peer's public key.
  if (absl::Status s = WriteNewFile(
          secret_path,
          absl::StrCat("# kvx control plane: CURVE secret key of instance ", name,
                       " (keep it on this instance's machines, mode 600)\n", keys.secret_key,
                       "\n"),
          0600);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = WriteNewFile(
          public_path,
          absl::StrCat("# kvx control plane: CURVE public key of instance ", name,
                       " (copy it to the key directory of every peer instance)\n",
                       keys.public_key, "\n"),
          0644);
      !s.ok()) {
    unlink(secret_path.c_str());
    return s;
  }
  return absl::OkStatus();
}

}  // namespace kvx::transfer
