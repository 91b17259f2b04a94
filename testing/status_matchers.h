// File: testing/status_matchers.h
//
// gMock matchers for absl::Status and absl::StatusOr<T>, which Abseil 20220623 does
// not ship (absl/status/status_matchers.h came later).
//
//   EXPECT_THAT(ParseThing(bytes), kvx::testing::IsOk());
//   EXPECT_THAT(TokenRange::Create(4, 2),
//               kvx::testing::StatusIs(absl::StatusCode::kInvalidArgument,
//                                      HasSubstr("start=4")));
//   EXPECT_THAT(ParseCount("9"), kvx::testing::IsOkAndHolds(9));
//   ASSERT_OK_AND_ASSIGN(auto range, TokenRange::Create(0, 8));
//
// Thread safety: stateless.

#ifndef KVX_TESTING_STATUS_MATCHERS_H_
#define KVX_TESTING_STATUS_MATCHERS_H_

#include <ostream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"

namespace kvx::testing {
namespace status_matchers_internal {

inline const absl::Status& GetStatus(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

}  // namespace status_matchers_internal

// Matches an OK Status or a StatusOr that holds a value.
MATCHER(IsOk, "is OK") {
  const absl::Status& status = status_matchers_internal::GetStatus(arg);
  if (!status.ok()) *result_listener << "status is " << status;
  return status.ok();
}

// Matches a Status (or StatusOr) with code `code` and a message matched by
// `message_matcher` (anything by default).
MATCHER_P2(StatusIs, code, message_matcher,
           "has code " + std::string(absl::StatusCodeToString(code))) {
  const absl::Status& status = status_matchers_internal::GetStatus(arg);
  *result_listener << "status is " << status;
  return status.code() == code &&
         ::testing::ExplainMatchResult(message_matcher, std::string(status.message()),
                                       result_listener);
}

inline auto StatusIs(absl::StatusCode code) { return StatusIs(code, ::testing::_); }

// Matches a StatusOr that holds a value matched by `value_matcher`.
MATCHER_P(IsOkAndHolds, value_matcher, "is OK and holds a matching value") {
  if (!arg.ok()) {
    *result_listener << "status is " << arg.status();
    return false;
  }
  return ::testing::ExplainMatchResult(value_matcher, *arg, result_listener);
}

}  // namespace kvx::testing

#define KVX_STATUS_MACROS_CONCAT_INNER_(x, y) x##y
#define KVX_STATUS_MACROS_CONCAT_(x, y) KVX_STATUS_MACROS_CONCAT_INNER_(x, y)

// Asserts that `rexpr` (a StatusOr) holds a value and moves it into `lhs`.
#define ASSERT_OK_AND_ASSIGN(lhs, rexpr)                                          \
  ASSERT_OK_AND_ASSIGN_IMPL_(KVX_STATUS_MACROS_CONCAT_(status_or_, __LINE__), lhs, \
                             rexpr)
#define ASSERT_OK_AND_ASSIGN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                               \
  ASSERT_TRUE(statusor.ok()) << statusor.status();       \
  lhs = std::move(statusor).value()

#define ASSERT_OK(expr) ASSERT_THAT((expr), ::kvx::testing::IsOk())
#define EXPECT_OK(expr) EXPECT_THAT((expr), ::kvx::testing::IsOk())

#endif  // KVX_TESTING_STATUS_MATCHERS_H_
