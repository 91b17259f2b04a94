#include "transfer/control_security.h"

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

// Tests may stop at a failure: value() does.
CurveKeyPair MustGenerate() { return GenerateCurveKeyPair().value(); }

ControlSecurity ValidCurve() {
  ControlSecurity security;
  security.mode = ControlSecurity::Mode::kCurve;
  security.keys = MustGenerate();
  security.peers["prefill-0"] = MustGenerate().public_key;
  security.peers["prefill-1"] = MustGenerate().public_key;
  return security;
}

TEST(ControlSecurity, CurveIsAvailable) {
  // Debian's libzmq5 is built with libsodium; without it the control plane cannot
  // be secured, and this says so first.
  EXPECT_TRUE(CurveAvailable());
}

TEST(ControlSecurity, GeneratedPairsAreValidAndDistinct) {
  const CurveKeyPair a = MustGenerate();
  const CurveKeyPair b = MustGenerate();
  EXPECT_THAT(ValidateCurveKey(a.public_key, "a"), IsOk());
  EXPECT_THAT(ValidateCurveKey(a.secret_key, "a"), IsOk());
  EXPECT_NE(a.public_key, b.public_key);
  EXPECT_NE(a.secret_key, b.secret_key);
  EXPECT_NE(a.public_key, a.secret_key);
}

TEST(ControlSecurity, OffIgnoresEveryOtherField) {
  ControlSecurity security;
  security.keys.public_key = "not a key";
  security.peers[""] = "neither";
  EXPECT_THAT(ValidateControlSecurity(security), IsOk());
}

TEST(ControlSecurity, ValidCurveConfigurationPasses) {
  EXPECT_THAT(ValidateControlSecurity(ValidCurve()), IsOk());
}

TEST(ControlSecurity, MalformedKeysAreInvalidArgument) {
  const std::string good = MustGenerate().public_key;
  const struct {
    const char* name;
    std::string key;
  } cases[] = {
      {"empty", ""},
      {"39 characters", good.substr(0, 39)},
      {"41 characters", good + "0"},
      {"outside the alphabet", std::string(39, '0') + "~"},
      {"a space", std::string(39, '0') + " "},
      // 85^5 - 1 overflows 32 bits: it cannot be the encoding of any key.
      {"overflowing group", std::string(40, '#')},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_THAT(ValidateCurveKey(c.key, "probe"),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("key=probe")));
  }
}

TEST(ControlSecurity, ErrorsNeverQuoteTheSecretKey) {
  ControlSecurity security = ValidCurve();
  security.keys.public_key = MustGenerate().public_key;  // from another pair
  const absl::Status status = ValidateControlSecurity(security);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("derives")));
  EXPECT_THAT(std::string(status.message()), Not(HasSubstr(security.keys.secret_key)));
}

TEST(ControlSecurity, InvalidCurveConfigurationsAreInvalidArgument) {
  const struct {
    const char* name;
    void (*change)(ControlSecurity&);
    const char* says;
  } cases[] = {
      {"bad own public key", [](ControlSecurity& s) { s.keys.public_key = "x"; }, "own public"},
      {"bad own secret key", [](ControlSecurity& s) { s.keys.secret_key = "x"; }, "own secret"},
      {"keys of two pairs",
       [](ControlSecurity& s) { s.keys.secret_key = MustGenerate().secret_key; }, "derives"},
      {"empty allowlist", [](ControlSecurity& s) { s.peers.clear(); }, "allowlist is empty"},
      {"empty peer name", [](ControlSecurity& s) { s.peers[""] = MustGenerate().public_key; },
       "printable"},
      {"peer name with a newline",
       [](ControlSecurity& s) { s.peers["a\nb"] = MustGenerate().public_key; }, "printable"},
      {"peer name of 256 bytes",
       [](ControlSecurity& s) { s.peers[std::string(256, 'p')] = MustGenerate().public_key; },
       "size=256"},
      {"bad peer key", [](ControlSecurity& s) { s.peers["prefill-0"] = "y"; },
       "key=peer prefill-0"},
      {"peer with this rank's key",
       [](ControlSecurity& s) { s.peers["me-again"] = s.keys.public_key; }, "own public key"},
      {"two peers, one key",
       [](ControlSecurity& s) { s.peers["prefill-2"] = s.peers["prefill-0"]; },
       "share a public key"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    ControlSecurity security = ValidCurve();
    c.change(security);
    EXPECT_THAT(ValidateControlSecurity(security),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.says)));
  }
}

}  // namespace
}  // namespace kvx::transfer
