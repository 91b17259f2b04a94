#include "transfer/curve_key_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transfer/control_security.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Key;
using ::testing::Not;

// A fresh directory under the test's temporary directory.
std::string MakeTempDir() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string templ = absl::StrCat(base != nullptr ? base : "/tmp", "/keys.XXXXXX");
  EXPECT_NE(mkdtemp(templ.data()), nullptr) << templ;
  return templ;
}

// Tests may stop at a failure: value() does.
CurveKeyPair MustGenerate() { return GenerateCurveKeyPair().value(); }

void WriteFile(const std::string& path, const std::string& text, mode_t mode) {
  unlink(path.c_str());
  {
    std::ofstream out(path);
    out << text;
  }
  ASSERT_EQ(chmod(path.c_str(), mode), 0) << path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

mode_t ModeOf(const std::string& path) {
  struct stat st;
  EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

class CurveKeyFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    decode_ = MustGenerate();
    prefill0_ = MustGenerate();
    prefill1_ = MustGenerate();
    ASSERT_THAT(WriteCurveKeyPair(dir_, "decode", decode_), IsOk());
    ASSERT_THAT(WriteCurveKeyPair(dir_, "prefill-0", prefill0_), IsOk());
    ASSERT_THAT(WriteCurveKeyPair(dir_, "prefill-1", prefill1_), IsOk());
  }
  std::string Path(const std::string& file) const { return absl::StrCat(dir_, "/", file); }

  std::string dir_;
  CurveKeyPair decode_, prefill0_, prefill1_;
};

TEST_F(CurveKeyFilesTest, WrittenPairLoadsWithEveryOtherPublicKeyAsThePeers) {
  absl::StatusOr<ControlSecurity> security = LoadCurveSecurity(dir_, "decode");
  ASSERT_THAT(security, IsOk());
  EXPECT_EQ(security->mode, ControlSecurity::Mode::kCurve);
  EXPECT_EQ(security->keys.public_key, decode_.public_key);
  EXPECT_EQ(security->keys.secret_key, decode_.secret_key);
  EXPECT_THAT(security->peers, ElementsAre(Key("prefill-0"), Key("prefill-1")));
  EXPECT_EQ(security->peers["prefill-0"], prefill0_.public_key);
  EXPECT_EQ(security->peers["prefill-1"], prefill1_.public_key);
  // Another instance's secret in the directory is not a peer and is not read.
  absl::StatusOr<ControlSecurity> prefill = LoadCurveSecurity(dir_, "prefill-0");
  ASSERT_THAT(prefill, IsOk());
  EXPECT_THAT(prefill->peers, ElementsAre(Key("decode"), Key("prefill-1")));
}

TEST_F(CurveKeyFilesTest, WriterSetsOwnerOnlyModeOnTheSecretWhateverTheUmask) {
  const mode_t old_umask = umask(0);
  const CurveKeyPair pair = MustGenerate();
  const absl::Status written = WriteCurveKeyPair(dir_, "open-umask", pair);
  umask(old_umask);
  ASSERT_THAT(written, IsOk());
  EXPECT_EQ(ModeOf(Path("open-umask.secret")), 0600u);
  EXPECT_EQ(ModeOf(Path("open-umask.pub")), 0644u);
  EXPECT_THAT(ReadCurveSecretKeyFile(Path("open-umask.secret")), IsOk());
}

TEST_F(CurveKeyFilesTest, WriterNeverReplacesAKey) {
  const std::string before = ReadFile(Path("decode.secret"));
  EXPECT_THAT(WriteCurveKeyPair(dir_, "decode", MustGenerate()),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("decode.pub")));
  EXPECT_EQ(ReadFile(Path("decode.secret")), before);
  // Only the public file left over from an earlier pair: still refused, and the
  // secret is not written beside it.
  ASSERT_EQ(unlink(Path("prefill-1.secret").c_str()), 0);
  EXPECT_THAT(WriteCurveKeyPair(dir_, "prefill-1", MustGenerate()),
              StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_NE(access(Path("prefill-1.pub").c_str(), F_OK), -1);
  EXPECT_EQ(access(Path("prefill-1.secret").c_str(), F_OK), -1);
}

TEST_F(CurveKeyFilesTest, SecretKeyOpenToGroupOrOthersIsRefused) {
  for (mode_t mode : {0644, 0640, 0604, 0660, 0602}) {
    SCOPED_TRACE(mode);
    ASSERT_EQ(chmod(Path("decode.secret").c_str(), mode), 0);
    EXPECT_THAT(
        LoadCurveSecurity(dir_, "decode"),
        StatusIs(absl::StatusCode::kFailedPrecondition,
                 HasSubstr(absl::StrCat("chmod 600 it): path=", Path("decode.secret")))));
  }
  ASSERT_EQ(chmod(Path("decode.secret").c_str(), 0644), 0);
  EXPECT_THAT(ReadCurveSecretKeyFile(Path("decode.secret")),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("mode=0644")));
  // A public key is public: 0644 is its normal mode.
  EXPECT_THAT(ReadCurvePublicKeyFile(Path("decode.pub")), IsOk());
  for (mode_t mode : {0600, 0400}) {
    ASSERT_EQ(chmod(Path("decode.secret").c_str(), mode), 0);
    EXPECT_THAT(LoadCurveSecurity(dir_, "decode"), IsOk()) << mode;
  }
}

TEST_F(CurveKeyFilesTest, MissingKeyFilesAreNotFoundAndNamed) {
  EXPECT_THAT(LoadCurveSecurity(dir_, "nobody"),
              StatusIs(absl::StatusCode::kNotFound,
                       HasSubstr(absl::StrCat("path=", Path("nobody.secret")))));
  ASSERT_EQ(unlink(Path("decode.pub").c_str()), 0);
  EXPECT_THAT(LoadCurveSecurity(dir_, "decode"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("decode.pub")));
  EXPECT_THAT(LoadCurveSecurity(Path("no-such-dir"), "decode"),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(CurveKeyFilesTest, KeysOfTwoPairsAreRefused) {
  WriteFile(Path("decode.pub"), prefill0_.public_key + "\n", 0644);
  EXPECT_THAT(LoadCurveSecurity(dir_, "decode"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("derives")));
}

TEST_F(CurveKeyFilesTest, AnInstanceWithoutPeersIsRefused) {
  const std::string alone = MakeTempDir();
  ASSERT_THAT(WriteCurveKeyPair(alone, "decode", decode_), IsOk());
  EXPECT_THAT(LoadCurveSecurity(alone, "decode"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("allowlist is empty")));
}

TEST_F(CurveKeyFilesTest, NoKeyStartsWithTheCommentMark) {
  // '#' is Z85 digit 84; a group's first digit is at most 82 (85^5 > 2^32), so a
  // line starting with '#' is never a key and the reader may skip it.
  for (int i = 0; i < 200; ++i) {
    std::string key = MustGenerate().public_key;
    key[0] = '#';
    ASSERT_THAT(ValidateCurveKey(key, "probe"), StatusIs(absl::StatusCode::kInvalidArgument))
        << key;
  }
}

TEST_F(CurveKeyFilesTest, KeyFileFormat) {
  const std::string key = prefill0_.public_key;
  const struct {
    const char* name;
    std::string text;
    bool ok;
  } cases[] = {
      {"bare key", key, true},
      {"key and newline", key + "\n", true},
      {"comments, blank lines, spaces", "# a comment\n#\n\n   " + key + "  \r\n#end\n", true},
      {"empty", "", false},
      {"comments only", "# nothing\n", false},
      {"two keys", key + "\n" + key + "\n", false},
      {"short key", key.substr(0, 39) + "\n", false},
      {"key with junk", key + "x\n", false},
      {"too long", "#" + std::string(5000, 'x') + "\n" + key + "\n", false},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    WriteFile(Path("probe.pub"), c.text, 0644);
    absl::StatusOr<std::string> read = ReadCurvePublicKeyFile(Path("probe.pub"));
    if (c.ok) {
      ASSERT_THAT(read, IsOk());
      EXPECT_EQ(*read, key);
    } else {
      EXPECT_THAT(read, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("probe.pub")));
    }
  }
  // A malformed peer file fails the whole load: a typo must not silently shrink the
  // allowlist.
  WriteFile(Path("probe.pub"), "not a key\n", 0644);
  EXPECT_THAT(LoadCurveSecurity(dir_, "decode"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("probe.pub")));
  // A directory is not a key file.
  unlink(Path("probe.pub").c_str());
  ASSERT_EQ(mkdir(Path("probe.pub").c_str(), 0755), 0);
  EXPECT_THAT(ReadCurvePublicKeyFile(Path("probe.pub")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("regular file")));
}

TEST_F(CurveKeyFilesTest, ErrorsNeverQuoteTheSecretKey) {
  // A secret that is almost a key: the reader's error must not echo it.
  const std::string almost = decode_.secret_key.substr(0, 39);
  WriteFile(Path("decode.secret"), almost + "\n", 0600);
  const absl::Status status = LoadCurveSecurity(dir_, "decode").status();
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(status.message()), Not(HasSubstr(almost)));
}

TEST_F(CurveKeyFilesTest, NamesThatAreNotOneFileNameAreRefused) {
  for (const char* name : {"", ".", "..", "../decode", "a/b", "line\nbreak"}) {
    SCOPED_TRACE(name);
    EXPECT_THAT(LoadCurveSecurity(dir_, name), StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(WriteCurveKeyPair(dir_, name, decode_),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
}

}  // namespace
}  // namespace kvx::transfer
