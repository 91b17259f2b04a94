#include "transport/transport_conformance_test.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "testing/random_fragments.h"
#include "testing/status_matchers.h"
#include "transport/internal/sanitizers.h"
#include "transport/transport.h"

namespace kvx::transport {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr unsigned char kGuard = 0xA5;

absl::Time DeadlineIn(absl::Duration d) { return absl::Now() + d; }

}  // namespace

void TransportConformanceTest::SetUp() {
  absl::StatusOr<std::unique_ptr<Transport>> a = GetParam().create();
  if (absl::IsUnavailable(a.status())) GTEST_SKIP() << a.status();
  ASSERT_OK(a.status());
  ASSERT_OK_AND_ASSIGN(target_, GetParam().create());
  initiator_ = *std::move(a);
  ASSERT_OK_AND_ASSIGN(peer_, initiator_->AddPeer(target_->address()));
}

namespace {

using ::kvx::testing::FillRandom;
using ::kvx::testing::FragmentLayout;
using ::kvx::testing::RandomFragment;
using ::kvx::testing::RandomFragmentLayout;

TEST_P(TransportConformanceTest, SingleWriteArrivesByteExact) {
  std::vector<unsigned char> src(4096), dst(4096 + 2, kGuard);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 7 + 1);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  const WriteOp op{s.id, 0, d.descriptor, 1, src.size()};
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       initiator_->PostWrites(peer_, {op}, DeadlineIn(absl::Seconds(20))));
  ASSERT_OK(initiator_->WaitTransfer(t, absl::InfiniteFuture()));
  EXPECT_EQ(dst.front(), kGuard);
  EXPECT_EQ(dst.back(), kGuard);
  EXPECT_EQ(std::memcmp(dst.data() + 1, src.data(), src.size()), 0);
  // The id is forgotten once its result was returned.
  EXPECT_THAT(initiator_->PollTransfer(t), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_OK(initiator_->DeregisterMemory(s.id));
  EXPECT_OK(target_->DeregisterMemory(d.id));
}

TEST_P(TransportConformanceTest, RandomFragmentsArriveByteExactWithGuards) {
  const uint32_t seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE(absl::StrCat("seed=", seed));
  std::mt19937_64 rng(seed);
  const uint64_t max_fragment = transport_internal::kSanitizedBuild ? (uint64_t{8} << 20) : (uint64_t{64} << 20);
  const FragmentLayout layout =
      RandomFragmentLayout(rng, max_fragment, 2 * max_fragment + (uint64_t{16} << 20));
  const std::vector<RandomFragment>& fragments = layout.fragments;
  const uint64_t dst_size = layout.dst_bytes;

  std::vector<unsigned char> src(layout.src_bytes);
  FillRandom(rng, absl::MakeSpan(src));
  std::vector<unsigned char> dst(dst_size, kGuard);
  std::vector<unsigned char> expected(dst_size, kGuard);
  for (const RandomFragment& f : fragments) {
    std::memcpy(expected.data() + f.dst_offset, src.data() + f.src_offset, f.length);
  }

  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  std::vector<WriteOp> ops;
  for (const RandomFragment& f : fragments) {
    ops.push_back({s.id, f.src_offset, d.descriptor, f.dst_offset, f.length});
  }
  ASSERT_OK_AND_ASSIGN(
      TransferId t, initiator_->PostWrites(peer_, ops, DeadlineIn(absl::Seconds(60))));
  ASSERT_OK(initiator_->WaitTransfer(t, absl::InfiniteFuture()));
  // memcmp first (fast); on a mismatch, name the first differing byte.
  if (std::memcmp(dst.data(), expected.data(), dst_size) != 0) {
    const auto diff = std::mismatch(dst.begin(), dst.end(), expected.begin());
    FAIL() << "first differing byte at offset=" << (diff.first - dst.begin())
           << " fragments=" << fragments.size();
  }
  EXPECT_OK(initiator_->DeregisterMemory(s.id));
  EXPECT_OK(target_->DeregisterMemory(d.id));
}

TEST_P(TransportConformanceTest, PollReportsProgressThenDone) {
  std::vector<unsigned char> src(1 << 20, 1), dst(1 << 20, 0);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       initiator_->PostWrites(peer_, {{s.id, 0, d.descriptor, 0, src.size()}},
                                                   DeadlineIn(absl::Seconds(20))));
  const absl::Time give_up = DeadlineIn(absl::Seconds(30));
  absl::StatusOr<TransferState> state;
  do {
    state = initiator_->PollTransfer(t);
    ASSERT_OK(state.status());
    ASSERT_LT(absl::Now(), give_up) << "transfer never ended";
  } while (*state == TransferState::kInProgress);
  EXPECT_EQ(dst, src);
}

TEST_P(TransportConformanceTest, RangePastEitherRegionIsRefusedBeforePosting) {
  std::vector<unsigned char> src(100), dst(100);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  const absl::Time deadline = DeadlineIn(absl::Seconds(10));
  struct Case {
    const char* name;
    WriteOp op;
    absl::StatusCode code;
  } cases[] = {
      {"local past end", {s.id, 50, d.descriptor, 0, 51}, absl::StatusCode::kOutOfRange},
      {"remote past end", {s.id, 0, d.descriptor, 99, 2}, absl::StatusCode::kOutOfRange},
      {"remote offset overflows", {s.id, 0, d.descriptor, ~uint64_t{0}, 2},
       absl::StatusCode::kOutOfRange},
      {"zero length", {s.id, 0, d.descriptor, 0, 0}, absl::StatusCode::kInvalidArgument},
      {"unknown region", {s.id + 1000, 0, d.descriptor, 0, 1}, absl::StatusCode::kNotFound},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_THAT(initiator_->PostWrites(peer_, {c.op}, deadline), StatusIs(c.code));
  }
  EXPECT_THAT(initiator_->PostWrites(peer_, {}, deadline),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(initiator_->PostWrites(peer_ + 1000, {{s.id, 0, d.descriptor, 0, 1}},
                                          deadline),
              StatusIs(absl::StatusCode::kNotFound));
  // Nothing was queued, so both regions deregister at once.
  EXPECT_OK(initiator_->DeregisterMemory(s.id));
  EXPECT_OK(target_->DeregisterMemory(d.id));
  EXPECT_THAT(target_->DeregisterMemory(d.id), StatusIs(absl::StatusCode::kNotFound));
}

TEST_P(TransportConformanceTest, TargetRefusesWrongKeyAndForgedLength) {
  if (!GetParam().skip_bad_peer_tests.empty()) GTEST_SKIP() << GetParam().skip_bad_peer_tests;
  std::vector<unsigned char> src(8192, 7), dst(4096, kGuard), after(4096, kGuard);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  RegionDescriptor wrong_key = d.descriptor;
  wrong_key.key += 12345;
  RegionDescriptor forged = d.descriptor;
  forged.length = 8192;  // The initiator believes it; the target must not.
  for (const RegionDescriptor& remote : {wrong_key, forged}) {
    SCOPED_TRACE(absl::StrCat("key=", remote.key, " length=", remote.length));
    const uint64_t offset = remote.length > 4096 ? 4096 : 0;
    ASSERT_OK_AND_ASSIGN(TransferId t,
                         initiator_->PostWrites(peer_, {{s.id, 0, remote, offset, 4096}},
                                                     DeadlineIn(absl::Seconds(10))));
    absl::Status status = initiator_->WaitTransfer(t, DeadlineIn(absl::Seconds(20)));
    EXPECT_THAT(status, Not(IsOk()));
    EXPECT_THAT(std::string(status.message()), HasSubstr("write=0"));
  }
  EXPECT_EQ(dst, std::vector<unsigned char>(4096, kGuard));
}

TEST_P(TransportConformanceTest, DeregisterWhileInFlightIsRefused) {
  const size_t n = transport_internal::kSanitizedBuild ? (8 << 20) : (64 << 20);
  std::vector<unsigned char> src(n, 3), dst(n, 0);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  std::vector<WriteOp> ops;
  for (size_t off = 0; off < n; off += 4096) ops.push_back({s.id, off, d.descriptor, off, 4096});
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       initiator_->PostWrites(peer_, ops, DeadlineIn(absl::Seconds(60))));
  absl::Status dereg = initiator_->DeregisterMemory(s.id);
  if (dereg.ok()) {
    // Allowed only if every write had already finished.
    EXPECT_THAT(initiator_->PollTransfer(t), IsOk());
  } else {
    EXPECT_THAT(dereg, StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("region=")));
    ASSERT_OK(initiator_->WaitTransfer(t, absl::InfiniteFuture()));
    EXPECT_OK(initiator_->DeregisterMemory(s.id));
  }
  EXPECT_EQ(dst, src);
}

TEST_P(TransportConformanceTest, PeerThatIsGoneFailsTheTransferByItsDeadline) {
  if (!GetParam().skip_bad_peer_tests.empty()) GTEST_SKIP() << GetParam().skip_bad_peer_tests;
  std::vector<unsigned char> src(1 << 20, 9), dst(1 << 20, 0);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  const RegionDescriptor remote = d.descriptor;
  target_.reset();
  const absl::Time deadline = DeadlineIn(absl::Seconds(3));
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       initiator_->PostWrites(peer_, {{s.id, 0, remote, 0, src.size()}},
                                                   deadline));
  absl::Status status = initiator_->WaitTransfer(t, deadline + absl::Seconds(5));
  EXPECT_THAT(status, Not(IsOk()));
  EXPECT_THAT(std::string(status.message()), Not(HasSubstr("wait deadline passed")));
}

TEST_P(TransportConformanceTest, WaitDeadlineBeforeTransferEndsKeepsTracking) {
  std::vector<unsigned char> src(1 << 20, 5), dst(1 << 20, 0);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator_->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, target_->RegisterMemory(dst.data(), dst.size()));
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       initiator_->PostWrites(peer_, {{s.id, 0, d.descriptor, 0, src.size()}},
                                                   DeadlineIn(absl::Seconds(20))));
  absl::Status early = initiator_->WaitTransfer(t, absl::InfinitePast());
  if (!early.ok()) {
    EXPECT_THAT(early, StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("wait deadline")));
    ASSERT_OK(initiator_->WaitTransfer(t, absl::InfiniteFuture()));
  }
  EXPECT_EQ(dst, src);
}

}  // namespace
}  // namespace kvx::transport
