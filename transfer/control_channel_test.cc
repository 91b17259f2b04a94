#include "transfer/control_channel.h"

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "sync/mutex.h"
#include "testing/status_matchers.h"
#include "transfer/control_security.h"
#include "zmq.hpp"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;
using Incoming = ControlChannel::Incoming;

// Every wait in these tests ends by this, far above what a loaded machine needs.
constexpr absl::Duration kPatience = absl::Seconds(20);

std::unique_ptr<ControlChannel> MustCreate(ControlChannelOptions options = {}) {
  absl::StatusOr<std::unique_ptr<ControlChannel>> channel =
      ControlChannel::Create(options);
  EXPECT_THAT(channel, IsOk());
  return channel.ok() ? std::move(channel).value() : nullptr;
}

std::unique_ptr<ControlChannel> MustCreateAt(const std::string& address) {
  ControlChannelOptions options;
  options.bind_address = address;
  return MustCreate(options);
}

// Polls `channel` until it holds at least `n` messages or kPatience passes.
std::vector<Incoming> ReceiveAtLeast(ControlChannel& channel, size_t n) {
  std::vector<Incoming> in;
  const absl::Time deadline = absl::Now() + kPatience;
  while (in.size() < n && absl::Now() < deadline) {
    EXPECT_THAT(channel.Poll(deadline, &in), IsOk());
  }
  return in;
}

// Sends `probe` to `to` until `receiver` gets a message whose bytes are `probe`
// (ZeroMQ may lose messages sent while a connection is being torn down and
// rebuilt); returns everything received, or stops after kPatience.
std::vector<Incoming> SendUntilReceived(ControlChannel& sender, ControlChannel& receiver,
                                        const std::string& to, const std::string& probe) {
  std::vector<Incoming> in;
  const absl::Time deadline = absl::Now() + kPatience;
  const auto received = [&] {
    for (const Incoming& m : in) {
      if (m.bytes == probe) return true;
    }
    return false;
  };
  while (!received() && absl::Now() < deadline) {
    EXPECT_THAT(sender.Send(to, probe), IsOk());
    EXPECT_THAT(
        receiver.Poll(std::min(deadline, absl::Now() + absl::Milliseconds(50)), &in),
        IsOk());
  }
  EXPECT_TRUE(received()) << "probe=" << probe;
  return in;
}

// A local address nothing listens on: a port the kernel just handed out and took
// back. Another process could bind it in between; tests that bind it again would
// then fail with Unavailable, loudly (the kernel hands ports out spread over a
// range of tens of thousands, so it does not happen in practice).
std::string UnusedAddress() {
  std::unique_ptr<ControlChannel> probe = MustCreate();
  return probe == nullptr ? "" : probe->address();
}

TEST(ControlChannel, AddressHasTheKernelChosenPort) {
  std::unique_ptr<ControlChannel> channel = MustCreate();
  ASSERT_NE(channel, nullptr);
  const std::string& address = channel->address();
  ASSERT_THAT(address, ::testing::StartsWith("tcp://127.0.0.1:"));
  int port = 0;
  ASSERT_TRUE(
      absl::SimpleAtoi(address.substr(std::string("tcp://127.0.0.1:").size()), &port))
      << address;
  EXPECT_GT(port, 0);
}

TEST(ControlChannel, ExchangesMessagesBothWays) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  std::unique_ptr<ControlChannel> b = MustCreate();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_THAT(a->Send(b->address(), "ping"), IsOk());
  std::vector<Incoming> at_b = ReceiveAtLeast(*b, 1);
  ASSERT_EQ(at_b.size(), 1u);
  EXPECT_EQ(at_b[0].from, a->address());
  EXPECT_EQ(at_b[0].bytes, "ping");

  // Binary payloads, the empty one included, arrive as sent.
  const std::string binary("\0\xff\x01kvx\0", 7);
  ASSERT_THAT(b->Send(at_b[0].from, binary), IsOk());
  ASSERT_THAT(b->Send(at_b[0].from, ""), IsOk());
  std::vector<Incoming> at_a = ReceiveAtLeast(*a, 2);
  ASSERT_EQ(at_a.size(), 2u);
  EXPECT_EQ(at_a[0].from, b->address());
  EXPECT_EQ(at_a[0].bytes, binary);
  EXPECT_EQ(at_a[1].bytes, "");
}

TEST(ControlChannel, PreservesOrderPerPeerOverThousandsOfMessages) {
  constexpr int kMessages = 5000;
  std::unique_ptr<ControlChannel> a = MustCreate();
  std::unique_ptr<ControlChannel> c = MustCreate();
  std::unique_ptr<ControlChannel> b = MustCreate();
  ASSERT_TRUE(a && b && c);
  // Two senders interleave into b while b answers a in the other direction.
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_THAT(a->Send(b->address(), absl::StrCat("a", i)), IsOk());
    ASSERT_THAT(c->Send(b->address(), absl::StrCat("c", i)), IsOk());
    ASSERT_THAT(b->Send(a->address(), absl::StrCat("b", i)), IsOk());
  }
  std::vector<Incoming> at_b = ReceiveAtLeast(*b, 2 * kMessages);
  std::vector<Incoming> at_a = ReceiveAtLeast(*a, kMessages);
  ASSERT_EQ(at_b.size(), 2u * kMessages);
  ASSERT_EQ(at_a.size(), static_cast<size_t>(kMessages));
  int next_a = 0;
  int next_c = 0;
  for (const Incoming& m : at_b) {
    if (m.from == a->address()) {
      ASSERT_EQ(m.bytes, absl::StrCat("a", next_a++));
    } else {
      ASSERT_EQ(m.from, c->address());
      ASSERT_EQ(m.bytes, absl::StrCat("c", next_c++));
    }
  }
  EXPECT_EQ(next_a, kMessages);
  EXPECT_EQ(next_c, kMessages);
  for (int i = 0; i < kMessages; ++i) ASSERT_EQ(at_a[i].bytes, absl::StrCat("b", i));
}

TEST(ControlChannel, OnePollReturnsAtMostMaxMessagesPerPoll) {
  ControlChannelOptions options;
  options.max_messages_per_poll = 3;
  std::unique_ptr<ControlChannel> b = MustCreate(options);
  std::unique_ptr<ControlChannel> a = MustCreate();
  ASSERT_TRUE(a && b);
  for (int i = 0; i < 10; ++i)
    ASSERT_THAT(a->Send(b->address(), absl::StrCat(i)), IsOk());
  std::vector<Incoming> in;
  const absl::Time deadline = absl::Now() + kPatience;
  while (in.size() < 10 && absl::Now() < deadline) {
    const size_t before = in.size();
    ASSERT_THAT(b->Poll(deadline, &in), IsOk());
    EXPECT_LE(in.size() - before, 3u);
  }
  ASSERT_EQ(in.size(), 10u);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(in[i].bytes, absl::StrCat(i));
}

TEST(ControlChannel, WakeFromAnotherThreadEndsPoll) {
  std::unique_ptr<ControlChannel> channel = MustCreate();
  ASSERT_NE(channel, nullptr);
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE(absl::StrCat("round=", round));
    // The deadline is far beyond kPatience: only the wake can end this Poll in time
    // for the test to pass.
    const absl::Time deadline = absl::Now() + absl::Hours(1);
    std::thread waker([&channel] { channel->Wake(); });
    std::vector<Incoming> in;
    EXPECT_THAT(channel->Poll(deadline, &in), IsOk());
    waker.join();
    EXPECT_TRUE(in.empty());
    EXPECT_LT(absl::Now(), deadline);
  }
}

TEST(ControlChannel, WakesBeforePollCountOnce) {
  std::unique_ptr<ControlChannel> channel = MustCreate();
  ASSERT_NE(channel, nullptr);
  channel->Wake();
  channel->Wake();
  std::vector<Incoming> in;
  EXPECT_THAT(channel->Poll(absl::Now() + absl::Hours(1), &in), IsOk());
  // Both wakes were consumed: the next Poll runs to its deadline.
  const absl::Time deadline = absl::Now() + absl::Milliseconds(20);
  EXPECT_THAT(channel->Poll(deadline, &in), IsOk());
  EXPECT_GE(absl::Now(), deadline);
  EXPECT_TRUE(in.empty());
}

TEST(ControlChannel, PollWithAPastDeadlineReturnsAtOnce) {
  std::unique_ptr<ControlChannel> channel = MustCreate();
  ASSERT_NE(channel, nullptr);
  std::vector<Incoming> in;
  // Would block forever if it waited (the test would time out).
  EXPECT_THAT(channel->Poll(absl::InfinitePast(), &in), IsOk());
  EXPECT_THAT(channel->Poll(absl::Now(), &in), IsOk());
  EXPECT_TRUE(in.empty());
}

TEST(ControlChannel, DropsOversizeMessagesAndDeliversLaterOnes) {
  ControlChannelOptions options;
  options.max_message_bytes = 1024;
  std::unique_ptr<ControlChannel> b = MustCreate(options);
  std::unique_ptr<ControlChannel> a = MustCreate();
  ASSERT_TRUE(a && b);
  const std::string at_limit(1024, 'x');
  ASSERT_THAT(a->Send(b->address(), at_limit), IsOk());
  std::vector<Incoming> in = ReceiveAtLeast(*b, 1);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].bytes, at_limit);

  ASSERT_THAT(a->Send(b->address(), std::string(1025, 'y')), IsOk());
  in = SendUntilReceived(*a, *b, b->address(), "after");
  for (const Incoming& m : in) EXPECT_LE(m.bytes.size(), 1024u);
}

TEST(ControlChannel, QueuesForAPeerThatIsNotUpYet) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  ASSERT_NE(a, nullptr);
  const std::string address = UnusedAddress();
  ASSERT_THAT(a->Send(address, "early"), IsOk());
  ASSERT_THAT(a->Send(address, "second"), IsOk());
  std::unique_ptr<ControlChannel> b = MustCreateAt(address);
  ASSERT_NE(b, nullptr);
  std::vector<Incoming> in = ReceiveAtLeast(*b, 2);
  ASSERT_EQ(in.size(), 2u);
  EXPECT_EQ(in[0].from, a->address());
  EXPECT_EQ(in[0].bytes, "early");
  EXPECT_EQ(in[1].bytes, "second");
}

TEST(ControlChannel, ReachesAPeerRestartedOnTheSameAddress) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  std::unique_ptr<ControlChannel> b = MustCreate();
  ASSERT_TRUE(a && b);
  const std::string address = b->address();
  ASSERT_THAT(a->Send(address, "before"), IsOk());
  ASSERT_EQ(ReceiveAtLeast(*b, 1).size(), 1u);
  b.reset();
  b = MustCreateAt(address);
  ASSERT_NE(b, nullptr);
  std::vector<Incoming> in = SendUntilReceived(*a, *b, address, "after restart");
  ASSERT_FALSE(in.empty());
  EXPECT_EQ(in.back().from, a->address());
}

TEST(ControlChannel, DisconnectThenSendReconnects) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  std::unique_ptr<ControlChannel> b = MustCreate();
  ASSERT_TRUE(a && b);
  a->Disconnect(b->address());  // never sent to: a no-op
  // Each round opens a new connection under the same routing id while the old
  // one may still be closing on b's side.
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE(absl::StrCat("round=", round));
    const std::string bytes = absl::StrCat("round ", round);
    ASSERT_THAT(a->Send(b->address(), bytes), IsOk());
    std::vector<Incoming> in = ReceiveAtLeast(*b, 1);
    ASSERT_EQ(in.size(), 1u);
    EXPECT_EQ(in[0].from, a->address());
    EXPECT_EQ(in[0].bytes, bytes);
    a->Disconnect(b->address());
  }
}

TEST(ControlChannel, DisconnectDropsWhatIsQueued) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  ASSERT_NE(a, nullptr);
  const std::string address = UnusedAddress();
  ASSERT_THAT(a->Send(address, "stale"), IsOk());
  a->Disconnect(address);
  ASSERT_THAT(a->Send(address, "fresh"), IsOk());
  std::unique_ptr<ControlChannel> b = MustCreateAt(address);
  ASSERT_NE(b, nullptr);
  // "fresh" arrives on the new connection. "stale" was dropped with the old socket
  // unless libzmq, closing that socket in the background, connected it to `b` first
  // (3 runs in 600 under load): then it comes at most once, in either order.
  std::vector<Incoming> in = ReceiveAtLeast(*b, 1);
  if (in.size() == 1 && in[0].bytes == "stale") {
    std::vector<Incoming> more = ReceiveAtLeast(*b, 1);
    in.insert(in.end(), more.begin(), more.end());
  }
  EXPECT_THAT(b->Poll(absl::InfinitePast(), &in), IsOk());
  std::vector<std::string> fresh, stale;
  for (const Incoming& message : in) {
    (message.bytes == "fresh" ? fresh : stale).push_back(message.bytes);
  }
  EXPECT_EQ(fresh.size(), 1u);
  EXPECT_THAT(stale, ::testing::AnyOf(::testing::IsEmpty(),
                                      ::testing::ElementsAre("stale")));
}

TEST(ControlChannel, DropsForeignMultiFrameMessages) {
  std::unique_ptr<ControlChannel> b = MustCreate();
  ASSERT_NE(b, nullptr);
  // A peer that is not a ControlChannel: a bare DEALER sending three frames, then
  // one.
  zmq::context_t context;
  zmq::socket_t foreign(context, zmq::socket_type::dealer);
  foreign.set(zmq::sockopt::routing_id, "foreign");
  foreign.set(zmq::sockopt::linger, 0);
  foreign.connect(b->address());
  ASSERT_TRUE(foreign.send(zmq::str_buffer("one"), zmq::send_flags::sndmore));
  ASSERT_TRUE(foreign.send(zmq::str_buffer("two"), zmq::send_flags::sndmore));
  ASSERT_TRUE(foreign.send(zmq::str_buffer("three"), zmq::send_flags::none));
  ASSERT_TRUE(foreign.send(zmq::str_buffer("single"), zmq::send_flags::none));
  std::vector<Incoming> in = ReceiveAtLeast(*b, 1);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].from, "foreign");
  EXPECT_EQ(in[0].bytes, "single");
}

TEST(ControlChannel, FullQueueIsResourceExhausted) {
  ControlChannelOptions options;
  options.send_high_water_mark = 4;
  options.linger = absl::ZeroDuration();  // nothing will take the queued messages
  std::unique_ptr<ControlChannel> a = MustCreate(options);
  ASSERT_NE(a, nullptr);
  const std::string address = UnusedAddress();  // nobody reads
  for (int i = 0; i < options.send_high_water_mark; ++i) {
    ASSERT_THAT(a->Send(address, "x"), IsOk());
  }
  absl::Status full;
  for (int i = 0; i < 100 && full.ok(); ++i) full = a->Send(address, "x");
  EXPECT_THAT(full, StatusIs(absl::StatusCode::kResourceExhausted,
                             HasSubstr("send_high_water_mark=4")));
}

TEST(ControlChannel, BindingAnAddressInUseIsUnavailable) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  ASSERT_NE(a, nullptr);
  ControlChannelOptions options;
  options.bind_address = a->address();
  EXPECT_THAT(ControlChannel::Create(options),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("cannot bind")));
}

TEST(ControlChannel, MalformedAddressesAreInvalidArgument) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  ASSERT_NE(a, nullptr);
  const std::string both[] = {
      "",
      "127.0.0.1:5555",
      "udp://127.0.0.1:5555",
      "ipc:///tmp/kvx",
      "tcp://127.0.0.1",
      "tcp://127.0.0.1:",
      "tcp://127.0.0.1:99999",
      "tcp://127.0.0.1:-1",
      "tcp://127.0.0.1:+1",
      "tcp://127.0.0.1:12a",
      "tcp://:5555",
      "tcp://bad host:5555",
      "tcp://127.0.0.1\n:5555",
  };
  for (const std::string& address : both) {
    SCOPED_TRACE(address);
    ControlChannelOptions options;
    options.bind_address = address;
    EXPECT_THAT(ControlChannel::Create(options),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("address=")));
    EXPECT_THAT(a->Send(address, "x"), StatusIs(absl::StatusCode::kInvalidArgument));
  }
  // Fine to bind, not to send to.
  for (const std::string address : {"tcp://127.0.0.1:0", "tcp://*:5555"}) {
    SCOPED_TRACE(address);
    EXPECT_THAT(a->Send(address, "x"), StatusIs(absl::StatusCode::kInvalidArgument));
  }
}

TEST(ControlChannel, InvalidOptionsAreInvalidArgument) {
  const auto with = [](auto change) {
    ControlChannelOptions options;
    change(options);
    return ControlChannel::Create(options).status();
  };
  EXPECT_THAT(with([](ControlChannelOptions& o) { o.send_high_water_mark = -1; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(with([](ControlChannelOptions& o) { o.receive_high_water_mark = -1; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(with([](ControlChannelOptions& o) { o.send_timeout = -absl::Seconds(1); }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(with([](ControlChannelOptions& o) { o.linger = -absl::Seconds(1); }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(with([](ControlChannelOptions& o) { o.max_messages_per_poll = 0; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// --- CURVE ------------------------------------------------------------------------

// The lines a channel logs, for tests to wait on.
class LogLines {
 public:
  std::function<void(absl::string_view)> Sink() {
    return [this](absl::string_view line) {
      sync::MutexLock lock(&mu_);
      lines_.emplace_back(line);
      changed_.SignalAll();
    };
  }

  // Waits until `count` lines contain `needle` or kPatience passes.
  bool WaitFor(absl::string_view needle, int count = 1) {
    const absl::Time deadline = absl::Now() + kPatience;
    sync::MutexLock lock(&mu_);
    for (;;) {
      int found = 0;
      for (const std::string& line : lines_) found += absl::StrContains(line, needle) ? 1 : 0;
      if (found >= count) return true;
      if (changed_.WaitUntil(&lock, deadline)) return false;
    }
  }

  std::vector<std::string> Lines() {
    sync::MutexLock lock(&mu_);
    return lines_;
  }

 private:
  sync::Mutex mu_;
  sync::CondVar changed_;
  std::vector<std::string> lines_ ABSL_GUARDED_BY(mu_);
};

// Three instances: "a" and "b" allow each other; "outsider" allows "b" (so it can
// dial b with b's key) but nobody allows it.
class CurveChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_keys_ = GenerateCurveKeyPair().value();
    b_keys_ = GenerateCurveKeyPair().value();
    outsider_keys_ = GenerateCurveKeyPair().value();
    a_ = MustCreate(Curve(a_keys_, {{"b", b_keys_.public_key}}, &a_log_));
    b_ = MustCreate(Curve(b_keys_, {{"a", a_keys_.public_key}}, &b_log_));
    ASSERT_TRUE(a_ && b_);
    ASSERT_THAT(a_->SetPeerInstance(b_->address(), "b"), IsOk());
  }

  static ControlChannelOptions Curve(const CurveKeyPair& keys,
                                     std::map<std::string, std::string> peers,
                                     LogLines* log) {
    ControlChannelOptions options;
    options.security.mode = ControlSecurity::Mode::kCurve;
    options.security.keys = keys;
    options.security.peers = std::move(peers);
    options.log = log->Sink();
    return options;
  }

  // A bare ZeroMQ client dialing b with the given keys (nullptr: no CURVE).
  zmq::socket_t RawClientOfB(const CurveKeyPair* keys) {
    zmq::socket_t client(raw_context_, zmq::socket_type::dealer);
    client.set(zmq::sockopt::linger, 0);
    client.set(zmq::sockopt::routing_id, "raw");
    if (keys != nullptr) {
      client.set(zmq::sockopt::curve_serverkey, b_keys_.public_key);
      client.set(zmq::sockopt::curve_publickey, keys->public_key);
      client.set(zmq::sockopt::curve_secretkey, keys->secret_key);
    }
    client.connect(b_->address());
    return client;
  }

  // The legitimate peer still gets through, and nothing else did.
  void ExpectOnlyAReachesB() {
    std::vector<Incoming> in = SendUntilReceived(*a_, *b_, b_->address(), "legit");
    for (const Incoming& m : in) {
      EXPECT_EQ(m.peer_instance, "a");
      EXPECT_EQ(m.from, a_->address());
      EXPECT_EQ(m.bytes, "legit");
    }
  }

  // No line any channel logged holds a secret key.
  void ExpectNoSecretLogged() {
    for (LogLines* log : {&a_log_, &b_log_}) {
      for (const std::string& line : log->Lines()) {
        for (const CurveKeyPair* keys : {&a_keys_, &b_keys_, &outsider_keys_}) {
          EXPECT_FALSE(absl::StrContains(line, keys->secret_key)) << line;
        }
      }
    }
  }

  CurveKeyPair a_keys_, b_keys_, outsider_keys_;
  LogLines a_log_, b_log_;
  std::unique_ptr<ControlChannel> a_, b_;
  zmq::context_t raw_context_;
};

TEST_F(CurveChannelTest, ExchangesMessagesBothWaysAndNamesTheProvenInstance) {
  ASSERT_THAT(a_->Send(b_->address(), "ping"), IsOk());
  std::vector<Incoming> at_b = ReceiveAtLeast(*b_, 1);
  ASSERT_EQ(at_b.size(), 1u);
  EXPECT_EQ(at_b[0].from, a_->address());
  EXPECT_EQ(at_b[0].peer_instance, "a");
  EXPECT_EQ(at_b[0].bytes, "ping");

  ASSERT_THAT(b_->SetPeerInstance(at_b[0].from, at_b[0].peer_instance), IsOk());
  const std::string binary("\0\xff\x01kvx\0", 7);
  ASSERT_THAT(b_->Send(at_b[0].from, binary), IsOk());
  std::vector<Incoming> at_a = ReceiveAtLeast(*a_, 1);
  ASSERT_EQ(at_a.size(), 1u);
  EXPECT_EQ(at_a[0].peer_instance, "b");
  EXPECT_EQ(at_a[0].bytes, binary);
  EXPECT_EQ(a_->security_stats().refused_connections, 0);
  EXPECT_EQ(b_->security_stats().refused_connections, 0);
}

TEST_F(CurveChannelTest, SendsOnlyToAddressesTiedToAnAllowedInstance) {
  const std::string elsewhere = UnusedAddress();
  EXPECT_THAT(a_->Send(elsewhere, "x"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("SetPeerInstance")));
  EXPECT_THAT(a_->SetPeerInstance(elsewhere, "outsider"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("instance=outsider")));
  EXPECT_THAT(a_->SetPeerInstance("tcp://127.0.0.1:0", "b"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Tied once, an address is not re-tied to another instance on a later word.
  ControlChannelOptions options = Curve(a_keys_, {{"b", b_keys_.public_key},
                                                  {"c", outsider_keys_.public_key}},
                                        &a_log_);
  std::unique_ptr<ControlChannel> a2 = MustCreate(options);
  ASSERT_NE(a2, nullptr);
  ASSERT_THAT(a2->SetPeerInstance(b_->address(), "b"), IsOk());
  ASSERT_THAT(a2->SetPeerInstance(b_->address(), "b"), IsOk());  // the same: fine
  EXPECT_THAT(a2->SetPeerInstance(b_->address(), "c"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("tied_to=b")));
  a2->Disconnect(b_->address());
  EXPECT_THAT(a2->SetPeerInstance(b_->address(), "c"), IsOk());
}

TEST_F(CurveChannelTest, KeyOutsideTheAllowlistIsRefusedAndLogged) {
  std::unique_ptr<ControlChannel> outsider =
      MustCreate(Curve(outsider_keys_, {{"b", b_keys_.public_key}}, &a_log_));
  ASSERT_NE(outsider, nullptr);
  ASSERT_THAT(outsider->SetPeerInstance(b_->address(), "b"), IsOk());
  ASSERT_THAT(outsider->Send(b_->address(), "intrusion"), IsOk());
  ASSERT_TRUE(b_log_.WaitFor(absl::StrCat("not in the allowlist: key=",
                                          outsider_keys_.public_key)));
  EXPECT_GE(b_->security_stats().refused_keys, 1);
  EXPECT_GE(b_->security_stats().refused_connections, 1);
  // b has no way to answer it: the outsider is no instance b may send to.
  EXPECT_THAT(b_->SetPeerInstance(outsider->address(), "outsider"),
              StatusIs(absl::StatusCode::kNotFound));
  ExpectOnlyAReachesB();
  std::vector<Incoming> at_outsider;
  ASSERT_THAT(outsider->Poll(absl::InfinitePast(), &at_outsider), IsOk());
  EXPECT_TRUE(at_outsider.empty());
  ExpectNoSecretLogged();
}

TEST_F(CurveChannelTest, ClientWithAWrongSecretKeyIsRefused) {
  // It presents a's public key, which b allows, without a's secret key.
  const CurveKeyPair impostor{a_keys_.public_key, outsider_keys_.secret_key};
  zmq::socket_t client = RawClientOfB(&impostor);
  ASSERT_TRUE(client.send(zmq::str_buffer("impostor"), zmq::send_flags::none));
  ASSERT_TRUE(b_log_.WaitFor("CURVE keys failed"));
  EXPECT_GE(b_->security_stats().refused_connections, 1);
  EXPECT_EQ(b_->security_stats().refused_keys, 0);  // never got as far as the allowlist
  ExpectOnlyAReachesB();
  ExpectNoSecretLogged();
}

TEST_F(CurveChannelTest, ClientWithoutKeysIsRefused) {
  // A channel with security off, and a bare client: neither gets a message in.
  std::unique_ptr<ControlChannel> plain = MustCreate();
  ASSERT_NE(plain, nullptr);
  ASSERT_THAT(plain->Send(b_->address(), "plain"), IsOk());
  zmq::socket_t client = RawClientOfB(nullptr);
  ASSERT_TRUE(client.send(zmq::str_buffer("raw"), zmq::send_flags::none));
  // Which side sees the mechanisms differ first is a race: b reports either "does
  // not use CURVE" or a client that closed the connection; one line per client at
  // least (the first of each reason, and then the second of one).
  ASSERT_TRUE(b_log_.WaitFor("refused a connection", 2));
  EXPECT_GE(b_->security_stats().refused_connections, 2);
  EXPECT_EQ(b_->security_stats().refused_keys, 0);
  ExpectOnlyAReachesB();
}

TEST_F(CurveChannelTest, ServerThatCannotProveTheInstanceKeyGetsNothing) {
  // A rogue listens where a believes b is: it allows a, but holds another key.
  LogLines rogue_log;
  std::unique_ptr<ControlChannel> rogue =
      MustCreate(Curve(outsider_keys_, {{"a", a_keys_.public_key}}, &rogue_log));
  ASSERT_NE(rogue, nullptr);
  ASSERT_THAT(a_->SetPeerInstance(rogue->address(), "b"), IsOk());
  ASSERT_THAT(a_->Send(rogue->address(), "for b only"), IsOk());
  // a's hello is sealed for b's key: the rogue cannot even read who is calling.
  ASSERT_TRUE(rogue_log.WaitFor("CURVE keys failed"));
  std::vector<Incoming> at_rogue;
  ASSERT_THAT(rogue->Poll(absl::InfinitePast(), &at_rogue), IsOk());
  EXPECT_TRUE(at_rogue.empty());
  ExpectOnlyAReachesB();
}

TEST_F(CurveChannelTest, FromIsDeclaredButPeerInstanceIsProven) {
  // A client with a's keys claiming to be some other address.
  zmq::socket_t client = RawClientOfB(&a_keys_);
  ASSERT_TRUE(client.send(zmq::str_buffer("claim"), zmq::send_flags::none));
  std::vector<Incoming> in = ReceiveAtLeast(*b_, 1);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].from, "raw");
  EXPECT_EQ(in[0].peer_instance, "a");
}

TEST_F(CurveChannelTest, RepeatedRefusalsAreLoggedAtPowersOfTwo) {
  std::vector<zmq::socket_t> clients;
  for (int i = 0; i < 5; ++i) {
    clients.push_back(RawClientOfB(&outsider_keys_));
    ASSERT_TRUE(clients.back().send(zmq::str_buffer("x"), zmq::send_flags::none));
  }
  ASSERT_TRUE(b_log_.WaitFor("refusals=4"));
  std::set<int> logged;
  for (const std::string& line : b_log_.Lines()) {
    if (!absl::StrContains(line, outsider_keys_.public_key)) continue;
    int n = 0;
    ASSERT_TRUE(absl::SimpleAtoi(line.substr(line.rfind('=') + 1), &n)) << line;
    logged.insert(n);
  }
  // 1, 2, 4 (8 and more only if the clients retried that often), never 3 or 5.
  EXPECT_TRUE(logged.count(1) && logged.count(2) && logged.count(4));
  for (int n : logged) EXPECT_EQ(n & (n - 1), 0) << n;
  EXPECT_GE(b_->security_stats().refused_keys, 4);
}

TEST(ControlChannel, CurveWithoutKeysOrPeersIsInvalidArgument) {
  ControlChannelOptions options;
  options.security.mode = ControlSecurity::Mode::kCurve;
  EXPECT_THAT(ControlChannel::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("own public")));
  options.security.keys = GenerateCurveKeyPair().value();
  EXPECT_THAT(ControlChannel::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("allowlist is empty")));
}

TEST(ControlChannel, WithSecurityOffPeerInstanceIsEmptyAndTiesAreChecksOnly) {
  std::unique_ptr<ControlChannel> a = MustCreate();
  std::unique_ptr<ControlChannel> b = MustCreate();
  ASSERT_TRUE(a && b);
  EXPECT_THAT(a->SetPeerInstance(b->address(), "anyone"), IsOk());
  EXPECT_THAT(a->SetPeerInstance("tcp://127.0.0.1", "anyone"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_THAT(a->Send(b->address(), "ping"), IsOk());
  std::vector<Incoming> in = ReceiveAtLeast(*b, 1);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].peer_instance, "");
  EXPECT_EQ(b->security_stats().refused_connections, 0);
}

}  // namespace
}  // namespace kvx::transfer
