// The example at the top of transport.h, compiled and run as written (issue 7,
// finding 8: the header's examples must compile). Keep the two in sync.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport.h"

namespace {

absl::Status RunHeaderExample(kvx::transport::Transport* target,
                              kvx::transport::Transport* initiator, void* buf, uint64_t n,
                              kvx::transport::RegionId src) {
  const std::string initiator_address = initiator->address();
  // --- transport.h, target side ---
  absl::StatusOr<kvx::transport::RegionId> dst = target->RegisterMemory(buf, n);
  absl::StatusOr<kvx::transport::PeerId> writer = target->AddPeer(initiator_address);
  absl::StatusOr<kvx::transport::RegionDescriptor> grant =
      target->GrantRemoteWrite(*dst, *writer);
  // ---
  if (!grant.ok()) return grant.status();
  const std::string target_address = target->address();
  // --- transport.h, initiator side ---
  absl::StatusOr<kvx::transport::PeerId> peer = initiator->AddPeer(target_address);
  kvx::transport::WriteOp op{src, 0, *grant, 0, n};
  absl::StatusOr<kvx::transport::TransferId> t =
      initiator->PostWrites(*peer, {op}, absl::Now() + absl::Seconds(5));
  absl::Status done = kvx::transport::AwaitTransfer(*initiator, *t, absl::InfiniteFuture());
  // ---
  return done;
}

TEST(TransportHeaderExample, CompilesAndMovesTheBytes) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<kvx::transport::Transport> target,
                       kvx::transport::CreateLoopbackTransport());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<kvx::transport::Transport> initiator,
                       kvx::transport::CreateLoopbackTransport());
  std::vector<char> src(4096, 'x'), dst(4096, 0);
  ASSERT_OK_AND_ASSIGN(kvx::transport::RegionId s,
                       initiator->RegisterMemory(src.data(), src.size()));
  ASSERT_OK(RunHeaderExample(target.get(), initiator.get(), dst.data(), dst.size(), s));
  EXPECT_EQ(dst, src);
}

}  // namespace
