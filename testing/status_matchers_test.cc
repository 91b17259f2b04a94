#include "testing/status_matchers.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvx::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(StatusMatchers, IsOkMatchesOkStatusAndValue) {
  EXPECT_THAT(absl::OkStatus(), IsOk());
  EXPECT_THAT(absl::StatusOr<int>(3), IsOk());
  EXPECT_THAT(absl::InternalError("x"), Not(IsOk()));
  EXPECT_THAT(absl::StatusOr<int>(absl::NotFoundError("y")), Not(IsOk()));
}

TEST(StatusMatchers, StatusIsChecksCodeAndMessage) {
  absl::StatusOr<int> error = absl::OutOfRangeError("block=9 num_slots=4");
  EXPECT_THAT(error, StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(error, StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=9")));
  EXPECT_THAT(error, Not(StatusIs(absl::StatusCode::kInternal)));
  EXPECT_THAT(error, Not(StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=8"))));
}

TEST(StatusMatchers, IsOkAndHoldsMatchesTheValue) {
  EXPECT_THAT(absl::StatusOr<int>(3), IsOkAndHolds(3));
  EXPECT_THAT(absl::StatusOr<int>(3), Not(IsOkAndHolds(4)));
  EXPECT_THAT(absl::StatusOr<int>(absl::NotFoundError("y")), Not(IsOkAndHolds(3)));
}

TEST(StatusMatchers, AssertOkAndAssignMovesValue) {
  ASSERT_OK_AND_ASSIGN(int value, absl::StatusOr<int>(7));
  EXPECT_EQ(value, 7);
}

}  // namespace
}  // namespace kvx::testing
