// Initiator in this process, target in a child (libfabric_peer), tcp;ofi_rxm on
// 127.0.0.1. Addresses and descriptors cross a pipe, as a control plane would carry
// them. The child is a real process, so it can be stopped (SIGSTOP), killed, or fence
// us from its side and check its own memory.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "testing/random_fragments.h"
#include "testing/status_matchers.h"
#include "transport/internal/sanitizers.h"
#include "transport/libfabric/libfabric_transport.h"
#include "transport/transport.h"

extern char** environ;

namespace kvx::transport {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr bool kSanitized = transport_internal::kSanitizedBuild;
constexpr unsigned char kGuard = 0xA5;

// The child process and the two pipes to it. Killed and reaped on destruction.
class Peer {
 public:
  static absl::StatusOr<std::unique_ptr<Peer>> Start(uint64_t bytes) {
    const char* srcdir = std::getenv("TEST_SRCDIR");
    const std::string path =
        absl::StrCat(srcdir != nullptr ? srcdir : ".", "/kvx/transport/libfabric/libfabric_peer");
    int to_child[2], from_child[2];
    if (pipe2(to_child, O_CLOEXEC) != 0 || pipe2(from_child, O_CLOEXEC) != 0) {
      return absl::InternalError("pipe2 failed");
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, to_child[0], 0);
    posix_spawn_file_actions_adddup2(&actions, from_child[1], 1);
    const std::string bytes_flag = absl::StrCat("--bytes=", bytes);
    std::vector<char*> argv = {const_cast<char*>(path.c_str()),
                               const_cast<char*>("--provider=tcp;ofi_rxm"),
                               const_cast<char*>("--node=127.0.0.1"),
                               const_cast<char*>(bytes_flag.c_str()), nullptr};
    auto peer = std::unique_ptr<Peer>(new Peer());
    const int ret = posix_spawn(&peer->pid_, path.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(to_child[0]);
    close(from_child[1]);
    peer->in_ = to_child[1];
    peer->out_ = from_child[0];
    if (ret != 0) {
      peer->pid_ = -1;
      return absl::InternalError(absl::StrCat("posix_spawn ", path, ": ", std::strerror(ret)));
    }
    absl::StatusOr<std::string> ready = peer->ReadLine(absl::Now() + absl::Seconds(30));
    if (!ready.ok()) return ready.status();
    if (!absl::StartsWith(*ready, "READY ")) {
      return absl::InternalError(absl::StrCat("unexpected line from peer: ", *ready));
    }
    peer->address_ = absl::HexStringToBytes(ready->substr(6));
    return peer;
  }

  // Lets `initiator` write into the peer's buffer; returns the descriptor.
  absl::StatusOr<RegionDescriptor> Grant(const Transport& initiator) {
    absl::Status sent = Send(absl::StrCat("GRANT ", absl::BytesToHexString(initiator.address())));
    if (!sent.ok()) return sent;
    absl::StatusOr<std::string> line = ReadLine(absl::Now() + absl::Seconds(30));
    if (!line.ok()) return line.status();
    if (!absl::StartsWith(*line, "GRANTED ")) {
      return absl::InternalError(absl::StrCat("unexpected line from peer: ", *line));
    }
    return DecodeRegionDescriptor(absl::HexStringToBytes(line->substr(8)));
  }

  // Sends `command` and returns the peer's one-line answer.
  absl::StatusOr<std::string> Ask(absl::string_view command) {
    absl::Status sent = Send(command);
    if (!sent.ok()) return sent;
    return ReadLine(absl::Now() + absl::Seconds(60));
  }

  absl::StatusOr<std::string> ReadLine(absl::Time deadline) {
    std::string line;
    while (line.empty() || line.back() != '\n') {
      std::string chunk;
      absl::Status status = Read(1, deadline, &chunk);
      if (!status.ok()) return status;
      line += chunk;
    }
    line.pop_back();
    return line;
  }

  ~Peer() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    close(in_);
    close(out_);
  }

  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }

  absl::Status Send(absl::string_view command) {
    const std::string line = absl::StrCat(command, "\n");
    if (write(in_, line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
      return absl::InternalError("write to peer failed");
    }
    return absl::OkStatus();
  }

  // Reads exactly `n` bytes, or fails at `deadline`.
  absl::Status Read(size_t n, absl::Time deadline, std::string* out) {
    out->resize(n);
    size_t got = 0;
    while (got < n) {
      const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (ms <= 0) return absl::DeadlineExceededError("peer did not answer in time");
      pollfd p{out_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(std::min<int64_t>(ms, 1000))) <= 0) continue;
      const ssize_t r = read(out_, out->data() + got, n - got);
      if (r <= 0) return absl::UnavailableError("peer closed its output");
      got += static_cast<size_t>(r);
    }
    return absl::OkStatus();
  }

  void Kill() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  Peer() = default;
  pid_t pid_ = -1;
  int in_ = -1;
  int out_ = -1;
  std::string address_;
};

LibfabricOptions TcpOptions() {
  LibfabricOptions options;
  options.provider = "tcp;ofi_rxm";
  options.node = "127.0.0.1";
  return options;
}

double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// One small transfer, so the connection is up before the test's real one.
void Warm(Transport& initiator, PeerId peer, RegionId src, const RegionDescriptor& region) {
  absl::StatusOr<TransferId> t =
      initiator.PostWrites(peer, {{src, 0, region, 0, 1}}, absl::Now() + absl::Seconds(20));
  ASSERT_OK(t.status());
  ASSERT_OK(AwaitTransfer(initiator, *t, absl::InfiniteFuture()));
}

// `passes` passes of 1 MiB writes over the whole region: far more than moves in the
// moment a test needs to act.
std::vector<WriteOp> ManyPasses(RegionId src, const RegionDescriptor& region, int passes) {
  std::vector<WriteOp> ops;
  for (int pass = 0; pass < passes; ++pass) {
    for (uint64_t off = 0; off < region.length; off += (1 << 20)) {
      ops.push_back({src, off, region, off, std::min<uint64_t>(1 << 20, region.length - off)});
    }
  }
  return ops;
}

TEST(LibfabricTwoProcessTest, RandomFragmentsArriveByteExactWithGuards) {
  const uint32_t seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE(absl::StrCat("seed=", seed));
  std::mt19937_64 rng(seed);
  const uint64_t max_fragment = kSanitized ? (uint64_t{4} << 20) : (uint64_t{64} << 20);
  const testing::FragmentLayout layout =
      testing::RandomFragmentLayout(rng, max_fragment, max_fragment + (uint64_t{24} << 20));
  const std::vector<testing::RandomFragment>& fragments = layout.fragments;
  const uint64_t dst_size = layout.dst_bytes;

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Peer> peer, Peer::Start(dst_size));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> initiator, CreateLibfabricTransport(TcpOptions()));
  ASSERT_OK_AND_ASSIGN(PeerId peer_id, initiator->AddPeer(peer->address()));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor region, peer->Grant(*initiator));
  ASSERT_EQ(region.length, dst_size);

  std::vector<unsigned char> src(layout.src_bytes);
  testing::FillRandom(rng, absl::MakeSpan(src));
  std::string expected(dst_size, static_cast<char>(kGuard));
  std::vector<WriteOp> ops;
  ASSERT_OK_AND_ASSIGN(RegionId s, initiator->RegisterMemory(src.data(), src.size()));
  for (const testing::RandomFragment& f : fragments) {
    std::memcpy(expected.data() + f.dst_offset, src.data() + f.src_offset, f.length);
    ops.push_back({s, f.src_offset, region, f.dst_offset, f.length});
  }
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       initiator->PostWrites(peer_id, ops, absl::Now() + absl::Seconds(60)));
  ASSERT_OK(AwaitTransfer(*initiator, t, absl::InfiniteFuture()));

  // Completion means delivered: the dump, asked for only now, must show every byte.
  ASSERT_OK(peer->Send("DUMP"));
  std::string dump;
  ASSERT_OK(peer->Read(dst_size, absl::Now() + absl::Seconds(60), &dump));
  if (dump != expected) {
    const auto diff = std::mismatch(dump.begin(), dump.end(), expected.begin());
    FAIL() << "first differing byte at offset=" << (diff.first - dump.begin())
           << " fragments=" << fragments.size();
  }
  ASSERT_OK(peer->Send("EXIT"));
  EXPECT_OK(initiator->DeregisterMemory(s));
}

// The initiator's side of a target that is killed: the transfer fails by its
// deadline (Unavailable: the connection was reset) and quiesces, so the source can
// be deregistered.
TEST(LibfabricTwoProcessTest, PeerKilledMidTransferFailsBeforeDeadline) {
  const uint64_t region_bytes = kSanitized ? (uint64_t{8} << 20) : (uint64_t{64} << 20);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Peer> peer, Peer::Start(region_bytes));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> initiator, CreateLibfabricTransport(TcpOptions()));
  ASSERT_OK_AND_ASSIGN(PeerId peer_id, initiator->AddPeer(peer->address()));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor region, peer->Grant(*initiator));
  std::vector<unsigned char> src(region_bytes, 1);
  ASSERT_OK_AND_ASSIGN(RegionId s, initiator->RegisterMemory(src.data(), src.size()));
  Warm(*initiator, peer_id, s, region);

  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  ASSERT_OK_AND_ASSIGN(TransferId t, initiator->PostWrites(peer_id, ManyPasses(s, region, 64), deadline));
  peer->Kill();
  ASSERT_OK_AND_ASSIGN(TransferStatus status,
                       initiator->WaitTransfer(t, deadline + absl::Seconds(10)));
  EXPECT_EQ(status.state, TransferState::kQuiesced);
  EXPECT_THAT(status.error, ::kvx::testing::StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_OK(initiator->DeregisterMemory(s));
}

// Semantics 5 across processes: the target fences us mid-transfer and then checks its
// own memory: not one byte lands after its RemovePeer returned, and we never see
// success.
TEST(LibfabricTwoProcessTest, TargetFencesMidTransferAndNothingLandsAfter) {
  const uint64_t region_bytes = kSanitized ? (uint64_t{8} << 20) : (uint64_t{64} << 20);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Peer> peer, Peer::Start(region_bytes));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> initiator, CreateLibfabricTransport(TcpOptions()));
  ASSERT_OK_AND_ASSIGN(PeerId peer_id, initiator->AddPeer(peer->address()));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor region, peer->Grant(*initiator));
  std::vector<unsigned char> src(region_bytes, 0x3D);
  ASSERT_OK_AND_ASSIGN(RegionId s, initiator->RegisterMemory(src.data(), src.size()));
  Warm(*initiator, peer_id, s, region);

  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  ASSERT_OK_AND_ASSIGN(TransferId t, initiator->PostWrites(peer_id, ManyPasses(s, region, 64), deadline));
  EXPECT_THAT(peer->Ask("FENCE"), ::kvx::testing::IsOkAndHolds(std::string("FENCED")));
  ASSERT_OK_AND_ASSIGN(TransferStatus status, initiator->WaitTransfer(t, deadline + absl::Seconds(10)));
  EXPECT_EQ(status.state, TransferState::kQuiesced);
  EXPECT_THAT(status.error, ::kvx::testing::StatusIs(absl::StatusCode::kUnavailable));
  // Our writes can no longer open anything there either: a fresh transfer fails.
  ASSERT_OK_AND_ASSIGN(TransferId again, initiator->PostWrites(peer_id, {{s, 0, region, 0, 4096}},
                                                               absl::Now() + absl::Seconds(5)));
  ASSERT_OK_AND_ASSIGN(TransferStatus refused, initiator->WaitTransfer(again, absl::Now() + absl::Seconds(30)));
  EXPECT_EQ(refused.state, TransferState::kQuiesced);
  EXPECT_THAT(peer->Ask("UNCHANGED?"), ::kvx::testing::IsOkAndHolds(std::string("UNCHANGED")));
  ASSERT_OK(peer->Send("EXIT"));
}

// Semantics 7 with a real stopped process: a SIGSTOPped target delays only its own
// transfers; nothing spins meanwhile; the stuck transfer fails by its deadline and
// quiesces within the quiesce timeout (the connection is reset, so it is unsettled).
TEST(LibfabricTwoProcessTest, StoppedPeerDelaysOnlyItsOwnTransfers) {
  const uint64_t region_bytes = uint64_t{64} << 20;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Peer> stopped, Peer::Start(region_bytes));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Peer> healthy, Peer::Start(1 << 20));
  LibfabricOptions options = TcpOptions();
  options.endpoint.quiesce_timeout = absl::Milliseconds(500);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> initiator, CreateLibfabricTransport(options));
  ASSERT_OK_AND_ASSIGN(PeerId stopped_id, initiator->AddPeer(stopped->address()));
  ASSERT_OK_AND_ASSIGN(PeerId healthy_id, initiator->AddPeer(healthy->address()));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor stopped_region, stopped->Grant(*initiator));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor healthy_region, healthy->Grant(*initiator));
  std::vector<unsigned char> src(region_bytes, 0x5C);
  ASSERT_OK_AND_ASSIGN(RegionId s, initiator->RegisterMemory(src.data(), src.size()));
  Warm(*initiator, stopped_id, s, stopped_region);
  Warm(*initiator, healthy_id, s, healthy_region);

  ASSERT_EQ(kill(stopped->pid(), SIGSTOP), 0);
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  ASSERT_OK_AND_ASSIGN(TransferId stuck, initiator->PostWrites(stopped_id, ManyPasses(s, stopped_region, 16),
                                                               deadline));
  // Fill every window and socket buffer to the stopped peer: a wait that times out.
  EXPECT_THAT(initiator->WaitTransfer(stuck, absl::Now() + absl::Milliseconds(300)).status(),
              ::kvx::testing::StatusIs(absl::StatusCode::kDeadlineExceeded));
  for (int i = 0; i < 20; ++i) {
    ASSERT_OK_AND_ASSIGN(TransferId quick, initiator->PostWrites(healthy_id, {{s, 0, healthy_region, 0, 4096}},
                                                                 absl::Now() + absl::Seconds(5)));
    ASSERT_OK(AwaitTransfer(*initiator, quick, absl::InfiniteFuture())) << "i=" << i;
  }
  const double cpu_before = ProcessCpuSeconds();
  const absl::Time wall_before = absl::Now();
  ASSERT_OK_AND_ASSIGN(TransferStatus status,
                       initiator->WaitTransfer(stuck, deadline + absl::Seconds(30)));
  const double cpu = ProcessCpuSeconds() - cpu_before;
  const double wall = absl::ToDoubleSeconds(absl::Now() - wall_before);
  EXPECT_EQ(status.state, TransferState::kQuiesced);
  EXPECT_THAT(status.error, ::kvx::testing::StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_FALSE(status.target_settled) << "a stopped peer cannot confirm anything";
  // Bounded: by the deadline plus the quiesce timeout (and a margin for a busy machine).
  EXPECT_LE(absl::Now(), deadline + absl::Milliseconds(500) + absl::Seconds(5));
  if (!kSanitized) EXPECT_LT(cpu, 0.5 * wall) << "the owner thread spins on a stopped peer";
  std::printf("stopped peer: transfer quiesced %s after its deadline, cpu=%.3fs over wall=%.3fs\n",
              absl::FormatDuration(absl::Now() - deadline).c_str(), cpu, wall);
  EXPECT_OK(initiator->DeregisterMemory(s));  // Nothing reads the source any more.
  ASSERT_EQ(kill(stopped->pid(), SIGCONT), 0);
}

}  // namespace
}  // namespace kvx::transport
