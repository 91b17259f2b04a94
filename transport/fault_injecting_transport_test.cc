#include "transport/fault_injecting_transport.h"

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "sync/mutex.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport.h"

namespace kvx::transport {
namespace {

using ::kvx::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr char kGuard = 'g';

// A clock that moves only when told to.
class FakeClock {
 public:
  absl::Time Now() {
    sync::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    sync::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  sync::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_) = absl::Now();
};

class FaultInjectingTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> a, CreateLoopbackTransport());
    ASSERT_OK_AND_ASSIGN(target_, CreateLoopbackTransport());
    faulty_ = std::make_unique<FaultInjectingTransport>(std::move(a),
                                                        [this] { return clock_.Now(); });
    ASSERT_OK_AND_ASSIGN(peer_, faulty_->AddPeer(target_->address()));
    ASSERT_OK_AND_ASSIGN(src_region_, faulty_->RegisterMemory(src_.data(), src_.size()));
    ASSERT_OK_AND_ASSIGN(RegionId dst, target_->RegisterMemory(dst_bytes_.data(), dst_bytes_.size()));
    ASSERT_OK_AND_ASSIGN(PeerId writer, target_->AddPeer(faulty_->address()));
    ASSERT_OK_AND_ASSIGN(dst_, target_->GrantRemoteWrite(dst, writer));
  }

  // Writes i = 0..n-1 copy 8 bytes to target offset 8 * i.
  std::vector<WriteOp> Writes(int n) {
    std::vector<WriteOp> ops;
    for (int i = 0; i < n; ++i) ops.push_back({src_region_, 0, dst_, 8 * uint64_t(i), 8});
    return ops;
  }

  FakeClock clock_;
  std::unique_ptr<Transport> target_;
  std::unique_ptr<FaultInjectingTransport> faulty_;
  PeerId peer_ = 0;
  std::vector<char> src_ = std::vector<char>(8, 's');
  std::vector<char> dst_bytes_ = std::vector<char>(64, kGuard);
  RegionId src_region_ = 0;
  RegionDescriptor dst_;
};

TEST_F(FaultInjectingTransportTest, NthWriteFailsAndLaterWritesAreNotPosted) {
  faulty_->FailNthWrite(5);  // The batch of 4 passes; write 1 of the next fails.
  ASSERT_OK_AND_ASSIGN(TransferId first, faulty_->PostWrites(peer_, Writes(4), absl::Now() + absl::Seconds(10)));
  ASSERT_OK(AwaitTransfer(*faulty_, first, absl::InfiniteFuture()));
  std::fill(dst_bytes_.begin(), dst_bytes_.end(), kGuard);
  ASSERT_OK_AND_ASSIGN(TransferId second, faulty_->PostWrites(peer_, Writes(4), absl::Now() + absl::Seconds(10)));
  ASSERT_OK_AND_ASSIGN(TransferStatus status,
                       faulty_->WaitTransfer(second, absl::InfiniteFuture()));
  EXPECT_EQ(status.state, TransferState::kQuiesced);
  EXPECT_TRUE(status.target_settled);  // Write 0 was delivered, the rest never posted.
  EXPECT_THAT(status.error, StatusIs(absl::StatusCode::kUnavailable,
                                     AllOf(HasSubstr("injected fault"), HasSubstr("write=1"))));
  // Write 0 landed; writes 1..3 were never posted, so their bytes are untouched.
  EXPECT_EQ(std::string(dst_bytes_.data(), 8), std::string(8, 's'));
  EXPECT_EQ(std::string(dst_bytes_.data() + 8, 24), std::string(24, kGuard));
  // One shot: the next transfer succeeds.
  ASSERT_OK_AND_ASSIGN(TransferId third, faulty_->PostWrites(peer_, Writes(4), absl::Now() + absl::Seconds(10)));
  EXPECT_OK(AwaitTransfer(*faulty_, third, absl::InfiniteFuture()));
}

TEST_F(FaultInjectingTransportTest, FirstWriteFailingPostsNothing) {
  faulty_->FailNthWrite(0);
  ASSERT_OK_AND_ASSIGN(TransferId t, faulty_->PostWrites(peer_, Writes(2), absl::Now() + absl::Seconds(10)));
  ASSERT_OK_AND_ASSIGN(TransferStatus status, faulty_->PollTransfer(t));
  EXPECT_EQ(status.state, TransferState::kQuiesced);
  EXPECT_THAT(status.error, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("write=0")));
  EXPECT_EQ(dst_bytes_, std::vector<char>(64, kGuard));
  EXPECT_OK(faulty_->DeregisterMemory(src_region_));
}

TEST_F(FaultInjectingTransportTest, DelayedCompletionWaitsForTheClock) {
  faulty_->DelayCompletions(absl::Seconds(5));
  ASSERT_OK_AND_ASSIGN(TransferId t, faulty_->PostWrites(peer_, Writes(1), clock_.Now() + absl::Seconds(60)));
  // However long we wait in real time, the fake clock has not moved.
  EXPECT_THAT(faulty_->WaitTransfer(t, absl::Now() + absl::Milliseconds(100)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("wait deadline")));
  EXPECT_EQ(std::string(dst_bytes_.data(), 8), std::string(8, 's'));  // Data is there already.
  clock_.Advance(absl::Seconds(5));
  EXPECT_OK(AwaitTransfer(*faulty_, t, absl::InfiniteFuture()));
}

TEST_F(FaultInjectingTransportTest, DelayPastTheDeadlineFailsTheTransfer) {
  faulty_->DelayCompletions(absl::Seconds(5));
  ASSERT_OK_AND_ASSIGN(TransferId t, faulty_->PostWrites(peer_, Writes(1), clock_.Now() + absl::Seconds(1)));
  clock_.Advance(absl::Seconds(2));
  EXPECT_THAT(AwaitTransfer(*faulty_, t, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("injected fault")));
}

TEST_F(FaultInjectingTransportTest, DroppedPeerFailsPendingAndNewTransfers) {
  faulty_->DelayCompletions(absl::Hours(1));  // Keeps the transfer unreported.
  ASSERT_OK_AND_ASSIGN(TransferId t, faulty_->PostWrites(peer_, Writes(2), clock_.Now() + absl::Hours(2)));
  faulty_->DropPeer(peer_);
  ASSERT_OK_AND_ASSIGN(TransferStatus status, faulty_->WaitTransfer(t, absl::InfiniteFuture()));
  EXPECT_EQ(status.state, TransferState::kQuiesced);
  EXPECT_FALSE(status.target_settled);  // As after a lost connection.
  EXPECT_THAT(status.error,
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("peer dropped mid-transfer")));
  EXPECT_THAT(faulty_->PostWrites(peer_, Writes(1), absl::Now() + absl::Seconds(1)),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("injected fault")));
  EXPECT_THAT(faulty_->PollTransfer(t), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(FaultInjectingTransportTest, CancelFailsAtOnceAndQuiescesWithTheWrappedTransfer) {
  faulty_->DelayCompletions(absl::Hours(1));
  ASSERT_OK_AND_ASSIGN(TransferId t, faulty_->PostWrites(peer_, Writes(2), clock_.Now() + absl::Hours(2)));
  ASSERT_OK(faulty_->CancelTransfer(t));
  ASSERT_OK_AND_ASSIGN(TransferStatus status, faulty_->WaitTransfer(t, absl::InfiniteFuture()));
  EXPECT_EQ(status.state, TransferState::kQuiesced);
  EXPECT_THAT(status.error, StatusIs(absl::StatusCode::kAborted, HasSubstr("cancelled")));
  EXPECT_THAT(faulty_->CancelTransfer(t), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvx::transport
