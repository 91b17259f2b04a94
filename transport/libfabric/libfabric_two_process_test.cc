// Initiator in this process, target in a child (libfabric_peer), tcp;ofi_rxm on
// 127.0.0.1. Addresses and descriptors cross a pipe, as a control plane would carry
// them.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
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
    // READY <address> <descriptor>
    std::string line;
    while (line.empty() || line.back() != '\n') {
      std::string chunk;
      absl::Status status = peer->Read(1, absl::Now() + absl::Seconds(30), &chunk);
      if (!status.ok()) return status;
      line += chunk;
    }
    std::vector<std::string> parts = absl::StrSplit(absl::StripSuffix(line, "\n"), ' ');
    if (parts.size() != 3 || parts[0] != "READY") {
      return absl::InternalError(absl::StrCat("unexpected line from peer: ", line));
    }
    peer->address_ = absl::HexStringToBytes(parts[1]);
    absl::StatusOr<RegionDescriptor> d = DecodeRegionDescriptor(absl::HexStringToBytes(parts[2]));
    if (!d.ok()) return d.status();
    peer->region_ = *d;
    return peer;
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
  const RegionDescriptor& region() const { return region_; }

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
  RegionDescriptor region_;
};

LibfabricOptions TcpOptions() {
  LibfabricOptions options;
  options.provider = "tcp;ofi_rxm";
  options.node = "127.0.0.1";
  return options;
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
  ASSERT_EQ(peer->region().length, dst_size);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> initiator, CreateLibfabricTransport(TcpOptions()));
  ASSERT_OK_AND_ASSIGN(PeerId peer_id, initiator->AddPeer(peer->address()));

  std::vector<unsigned char> src(layout.src_bytes);
  testing::FillRandom(rng, absl::MakeSpan(src));
  std::string expected(dst_size, static_cast<char>(kGuard));
  std::vector<WriteOp> ops;
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator->RegisterMemory(src.data(), src.size()));
  for (const testing::RandomFragment& f : fragments) {
    std::memcpy(expected.data() + f.dst_offset, src.data() + f.src_offset, f.length);
    ops.push_back({s.id, f.src_offset, peer->region(), f.dst_offset, f.length});
  }
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       initiator->PostWrites(peer_id, ops, absl::Now() + absl::Seconds(60)));
  ASSERT_OK(initiator->WaitTransfer(t, absl::InfiniteFuture()));

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
  EXPECT_OK(initiator->DeregisterMemory(s.id));
}

TEST(LibfabricTwoProcessTest, PeerKilledMidTransferFailsBeforeDeadline) {
  const uint64_t region_bytes = kSanitized ? (uint64_t{8} << 20) : (uint64_t{64} << 20);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Peer> peer, Peer::Start(region_bytes));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> initiator, CreateLibfabricTransport(TcpOptions()));
  ASSERT_OK_AND_ASSIGN(PeerId peer_id, initiator->AddPeer(peer->address()));
  std::vector<unsigned char> src(region_bytes, 1);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, initiator->RegisterMemory(src.data(), src.size()));

  // Warm the connection so the kill lands mid-transfer, not mid-connect.
  ASSERT_OK_AND_ASSIGN(TransferId warm,
                       initiator->PostWrites(peer_id, {{s.id, 0, peer->region(), 0, 1}},
                                             absl::Now() + absl::Seconds(20)));
  ASSERT_OK(initiator->WaitTransfer(warm, absl::InfiniteFuture()));

  // Many passes over the region: far more than moves before the kill below.
  std::vector<WriteOp> ops;
  for (int pass = 0; pass < 64; ++pass) {
    for (uint64_t off = 0; off < region_bytes; off += (1 << 20)) {
      ops.push_back({s.id, off, peer->region(), off, 1 << 20});
    }
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  ASSERT_OK_AND_ASSIGN(TransferId t, initiator->PostWrites(peer_id, ops, deadline));
  peer->Kill();
  absl::Status status = initiator->WaitTransfer(t, deadline + absl::Seconds(5));
  const absl::Time ended = absl::Now();
  EXPECT_THAT(status, Not(::kvx::testing::IsOk()));
  EXPECT_THAT(std::string(status.message()), Not(HasSubstr("wait deadline passed")));
  EXPECT_LE(ended, deadline + absl::Seconds(1));
  std::printf("transfer to a killed peer ended %s before its deadline: %s\n",
              absl::FormatDuration(deadline - ended).c_str(), status.ToString().c_str());
  // A failure is reported only once nothing is in flight, so the region is free.
  if (!absl::IsDeadlineExceeded(status)) {
    EXPECT_OK(initiator->DeregisterMemory(s.id));
  }
}

}  // namespace
}  // namespace kvx::transport
