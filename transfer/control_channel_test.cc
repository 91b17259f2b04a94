#include "transfer/control_channel.h"

#include <cstddef>
#include <memory>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
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
  std::vector<Incoming> in = ReceiveAtLeast(*b, 1);
  // The closed socket dropped "stale" on Disconnect; nothing can deliver it now.
  EXPECT_THAT(b->Poll(absl::InfinitePast(), &in), IsOk());
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].bytes, "fresh");
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

}  // namespace
}  // namespace kvx::transfer
