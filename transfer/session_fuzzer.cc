// Stateful libFuzzer target for the session state machines (transfer/session.h):
// one request between 1..3 context ranks, each running a SenderSession, and 1..2
// generation ranks, each running a ReceiverSession, over any overlap between them,
// wired through a simulated network and transport that the input drives event by
// event (the format: transfer/internal/session_fuzz_ops.h). Messages travel
// encoded; the network delivers, reorders, duplicates, drops, truncates, flips a
// byte or gives a packet an unknown version; what no longer decodes is dropped and
// what reaches a rank is routed as the transceiver routes it (the claimed rank must
// be the sending one, the request must be this one). The engines give slices (also
// twice, past the last, with a wrong last flag, with other aux tokens) and cancel;
// the transport ends posted writes (delivered, failed settled, failed unsettled),
// and reports ends of pairs never posted; deadlines fire at any time; and anyone,
// strangers included, can send a message no session wrote.
//
// After every event, for every session (session.h's invariants):
//   - states only move forward, and a final state never changes;
//   - the first error wins (invariant 4); FULLY_TRANSFERRED has none, CANCELLED is
//     Aborted, ERROR has one;
//   - a sender posts each (slice, receiver) pair at most once, only with its slice
//     and request data, only to a receiver it overlaps (invariant 2); sends exactly
//     one SliceResult per pair whose request data it got, never two (invariant 3),
//     SUCCESS only for delivered writes, a settled FAILED only when nothing of the
//     pair can still land; aux tokens once per receiver, after its writes; a Cancel
//     to a receiver only when nothing of it to that receiver can still land, and
//     no post to it after (invariant 5); and is final only with nothing in flight
//     (invariant 1);
//   - a receiver is final only when each expected sender was fenced, said it is
//     done (its Cancel), or sent a settled result for every slice (invariant 1, as
//     the receiver knows it);
//   - across sessions: a receiver is final only when no expected sender can in
//     truth still write into its pages (each one fenced, or none of its writes in
//     flight or failed unsettled); KV_TRANSFERRED only when every expected sender
//     delivered every slice; FULLY_TRANSFERRED with aux tokens a sender sent.
//     These hold while every message a session got is one a session wrote: once a
//     forged or corrupted message that still decodes reached a session, a lying
//     peer can break them, and only the checks above remain.
// When the input ends, the engines give every slice, receivers start, the network
// delivers everything and writes complete; if nothing abnormal happened, every
// session must end FULLY_TRANSFERRED with the engine's aux tokens. Then time runs
// on (deadlines, report grace, fences) until every session must be final: no
// request hangs, whatever happened. A broken property aborts with the reason.
//
//   bazel build --config=fuzz //transfer:session_fuzzer
//   bazel-bin/transfer/session_fuzzer -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256
//       -max_total_time=60 /tmp/corpus transfer/session_fuzzer_corpus
//
// Seeds: transfer/session_fuzzer_corpus, written by //transfer:fuzz_seeds.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "testing/fuzz_bytes.h"
#include "testing/protocol_equality.h"
#include "transfer/internal/session_fuzz_ops.h"
#include "transfer/protocol.h"
#include "transfer/session.h"
#include "transfer/slice.h"

namespace kvx::transfer {
namespace {

namespace ops = transfer_internal::session_fuzz;
using ::kvx::testing::FuzzBytes;

constexpr uint64_t kRid = 7;
constexpr int64_t kTokensPerSlice = 16;
const absl::Time kStart = absl::FromUnixSeconds(int64_t{1} << 30);
constexpr size_t kMaxPackets = 64;    // duplicates stop there
constexpr int kSettleRounds = 32;     // after the input: far more than any run needs
constexpr size_t kMaxDeliveries = 100000;

[[noreturn]] void Broken(const std::string& what) {
  std::fprintf(stderr, "session invariant broken: %s\n", what.c_str());
  std::abort();
}

// Progress along kInit -> kReady -> kTransferring -> kKvTransferred -> final.
int Progress(SessionState state) {
  switch (state) {
    case SessionState::kInit:
      return 0;
    case SessionState::kReady:
      return 1;
    case SessionState::kTransferring:
      return 2;
    case SessionState::kKvTransferred:
      return 3;
    default:
      return 4;
  }
}

using PairKey = std::pair<int64_t, int64_t>;  // (slice, the peer rank)

// A posted pair's writes, as the simulated transport sees them.
enum class Write { kInFlight, kDelivered, kFailedSettled, kFailedUnsettled };
struct Transfer {
  Write state = Write::kInFlight;
  bool cancel_asked = false;
};

// A session as it was after the previous event.
struct Seen {
  SessionState state = SessionState::kInit;
  absl::Status error;
};

struct Sender {
  explicit Sender(int64_t rank) : rank(rank), session(kRid, rank) {}
  const int64_t rank;
  SenderSession session;
  std::set<int64_t> receivers;  // overlapping generation ranks
  std::set<int64_t> given;      // slice ids its engine gave
  std::map<PairKey, Transfer> transfers;  // every PostSlice
  std::map<PairKey, int> results;         // SliceResults sent, per overlapping pair
  std::set<PairKey> asked;                // pairs whose request data reached it
  std::map<int64_t, std::vector<int64_t>> aux_sent;  // receiver -> tokens
  std::set<int64_t> cancelled;  // receivers it sent a Cancel
  Seen seen;
};

struct Receiver {
  explicit Receiver(ReceiverRequest request)
      : rank(request.self_rank), session(std::move(request)) {}
  const int64_t rank;
  ReceiverSession session;
  std::set<int64_t> senders;  // overlapping context ranks
  bool started = false;
  std::set<int64_t> fenced;
  std::set<int64_t> released;  // expected senders whose Cancel reached the session
  // The first result of each (slice, sender) that reached the session before it
  // was final: the one it counts. True: SUCCESS or a settled FAILED.
  std::map<PairKey, bool> first_result;
  Seen seen;
};

struct Packet {
  bool to_receiver = false;
  int64_t from = 0;
  int64_t to = 0;
  std::string bytes;
  Message sent;  // what the bytes held when sent
};

std::string StateOf(SessionState state, const absl::Status& error) {
  return error.ok() ? std::string(SessionStateName(state))
                    : absl::StrCat(SessionStateName(state), " ", error.ToString());
}

KVSlice SliceOf(int64_t slice_id, bool last, int64_t first_block) {
  KVSlice slice;
  slice.token_range =
      *TokenRange::Create(slice_id * kTokensPerSlice, (slice_id + 1) * kTokensPerSlice);
  slice.block_ids_per_layer_group = {{first_block + slice_id}};
  slice.is_last_slice = last;
  return slice;
}

class World {
 public:
  explicit World(FuzzBytes& in);
  void Step(FuzzBytes& in);
  // The end of the input: everything delivered, then time runs out.
  void Finish();

 private:
  int64_t num_senders() const { return static_cast<int64_t>(senders_.size()); }
  int64_t num_receivers() const { return static_cast<int64_t>(receivers_.size()); }
  // A packet index, or nullopt when none is in flight; reads its operand either way.
  std::optional<size_t> PickPacket(FuzzBytes& in);

  void RunSender(Sender& s, std::vector<SessionAction> actions);
  void RunReceiver(Receiver& r, std::vector<SessionAction> actions);
  void SenderSent(Sender& s, const SendMessage& send);
  void ReceiverSent(const Receiver& r, const SendMessage& send);
  void Send(bool to_receiver, int64_t from, int64_t to, const Message& message);
  void Deliver(const Packet& packet);
  void AddSlice(Sender& s, int64_t slice_id, int variant);
  void EndTransfer(Sender& s, const PairKey& key, int outcome);
  void SpuriousEnd(Sender& s, const PairKey& key, int outcome);
  void Start(Receiver& r);
  void Forge(FuzzBytes& in);

  bool Settle();
  bool AllFinal() const;
  void Check();
  void CheckSender(Sender& s);
  void CheckReceiver(Receiver& r);
  void CheckDelivery(const Receiver& r) const;
  std::string Describe() const;

  int64_t slices_ = 1;
  std::deque<Sender> senders_;
  std::deque<Receiver> receivers_;
  std::vector<int64_t> aux_;
  std::optional<int64_t> aux_slot_;
  absl::Time sender_deadline_;
  std::deque<Packet> packets_;
  // The last request data each receiver sent each sender, per slice: replayed by
  // forged messages.
  std::map<std::tuple<int64_t, int64_t, int64_t>, RequestData> request_data_;
  absl::Time now_ = kStart;
  bool faulted_ = false;  // something a correct run does not see happened
  bool lied_ = false;     // a session got a message no session wrote
};

World::World(FuzzBytes& in) {
  const int64_t senders = in.Int(1, ops::kMaxSenders);
  const int64_t receivers = in.Int(1, ops::kMaxReceivers);
  slices_ = in.Int(1, ops::kMaxSlices);
  for (int64_t s = 0; s < senders; ++s) {
    senders_.emplace_back(s);
    int64_t mask = in.Int(0, (int64_t{1} << receivers) - 1);
    if (mask == 0) mask = (int64_t{1} << receivers) - 1;
    for (int64_t r = 0; r < receivers; ++r) {
      if ((mask >> r) & 1) senders_.back().receivers.insert(r);
    }
  }
  for (int64_t r = 0; r < receivers; ++r) {
    bool covered = false;
    for (const Sender& s : senders_) covered |= s.receivers.count(r) > 0;
    if (!covered) senders_[r % senders].receivers.insert(r);
  }
  sender_deadline_ = kStart + absl::Seconds(in.Int(1, 256));
  const absl::Time receiver_deadline = kStart + absl::Seconds(in.Int(1, 256));
  for (int64_t n = in.Int(0, 3); n > 0; --n) aux_.push_back(in.Int(0, 255));
  const int64_t slot = in.Int(0, 4);
  if (slot < 4) aux_slot_ = slot;

  for (Sender& s : senders_) {
    s.session.ExpectReceivers(std::vector<int64_t>(s.receivers.begin(), s.receivers.end()));
  }
  for (int64_t r = 0; r < receivers; ++r) {
    ReceiverRequest request;
    request.unique_rid = kRid;
    request.self_rank = r;
    request.prompt_len = slices_ * kTokensPerSlice;
    request.aux_slot = aux_slot_;
    for (int64_t k = 0; k < slices_; ++k) {
      request.slices.push_back(ReceiverSlice{k, SliceOf(k, k == slices_ - 1, 100 * (r + 1))});
    }
    request.deadline = receiver_deadline;
    request.report_grace = absl::Seconds(2);
    receivers_.emplace_back(std::move(request));
    for (const Sender& s : senders_) {
      if (s.receivers.count(r) > 0) receivers_.back().senders.insert(s.rank);
    }
  }
}

std::optional<size_t> World::PickPacket(FuzzBytes& in) {
  const int64_t index = in.Int(0, 255);
  if (packets_.empty()) return std::nullopt;
  return static_cast<size_t>(index) % packets_.size();
}

void World::Step(FuzzBytes& in) {
  switch (in.Int(0, ops::kNumOps - 1)) {
    case ops::kDeliver:
      if (const std::optional<size_t> i = PickPacket(in)) {
        const Packet packet = std::move(packets_[*i]);
        packets_.erase(packets_.begin() + *i);
        Deliver(packet);
      }
      break;
    case ops::kDuplicate:
      if (const std::optional<size_t> i = PickPacket(in); i && packets_.size() < kMaxPackets) {
        packets_.push_back(packets_[*i]);
      }
      break;
    case ops::kDrop:
      if (const std::optional<size_t> i = PickPacket(in)) {
        packets_.erase(packets_.begin() + *i);
        faulted_ = true;
      }
      break;
    case ops::kTruncate: {
      const std::optional<size_t> i = PickPacket(in);
      const int64_t length = in.Int(0, 255);
      if (i && !packets_[*i].bytes.empty()) {
        std::string& bytes = packets_[*i].bytes;
        bytes.resize(static_cast<size_t>(length) % bytes.size());
        faulted_ = true;
      }
      break;
    }
    case ops::kBadVersion:
      // [kind, version, ...]: a fixarray byte, the kind, then the version.
      if (const std::optional<size_t> i = PickPacket(in); i && packets_[*i].bytes.size() > 2) {
        packets_[*i].bytes[2] = static_cast<char>(kProtocolVersion + 1);
        faulted_ = true;
      }
      break;
    case ops::kFlipByte: {
      const std::optional<size_t> i = PickPacket(in);
      const int64_t position = in.Int(0, 255);
      const int64_t mask = in.Int(0, 255) | 1;
      if (i && !packets_[*i].bytes.empty()) {
        std::string& bytes = packets_[*i].bytes;
        bytes[static_cast<size_t>(position) % bytes.size()] ^= static_cast<char>(mask);
        faulted_ = true;
      }
      break;
    }
    case ops::kAddSlice: {
      Sender& s = senders_[in.Int(0, 255) % num_senders()];
      const int64_t slice_id = in.Int(0, 255) % (slices_ + 1);
      AddSlice(s, slice_id, static_cast<int>(in.Int(0, 255) % 5));
      break;
    }
    case ops::kEndTransfer: {
      Sender& s = senders_[in.Int(0, 255) % num_senders()];
      const int64_t index = in.Int(0, 255);
      const int outcome = static_cast<int>(in.Int(0, 255) % 3);
      std::vector<PairKey> in_flight;
      for (const auto& [key, t] : s.transfers) {
        if (t.state == Write::kInFlight) in_flight.push_back(key);
      }
      if (!in_flight.empty()) EndTransfer(s, in_flight[index % in_flight.size()], outcome);
      break;
    }
    case ops::kSpuriousEnd: {
      Sender& s = senders_[in.Int(0, 255) % num_senders()];
      const int64_t slice_id = in.Int(0, 255) % (slices_ + 1);
      const int64_t receiver = in.Int(0, 255) % num_receivers();
      SpuriousEnd(s, {slice_id, receiver}, static_cast<int>(in.Int(0, 255) % 3));
      break;
    }
    case ops::kStartReceiver:
      Start(receivers_[in.Int(0, 255) % num_receivers()]);
      break;
    case ops::kCancelSender: {
      Sender& s = senders_[in.Int(0, 255) % num_senders()];
      std::vector<SessionAction> actions;
      s.session.Cancel("cancelled by the context engine", &actions);
      faulted_ = true;
      RunSender(s, std::move(actions));
      break;
    }
    case ops::kCancelReceiver: {
      Receiver& r = receivers_[in.Int(0, 255) % num_receivers()];
      std::vector<SessionAction> actions;
      r.session.Cancel("cancelled by the generation engine", now_, &actions);
      faulted_ = true;
      RunReceiver(r, std::move(actions));
      break;
    }
    case ops::kFailReceiver: {
      Receiver& r = receivers_[in.Int(0, 255) % num_receivers()];
      std::vector<SessionAction> actions;
      r.session.Fail(absl::UnavailableError("no rank of the context instance overlaps this one"),
                     now_, &actions);
      faulted_ = true;
      RunReceiver(r, std::move(actions));
      break;
    }
    case ops::kDeadline: {
      const int64_t index = in.Int(0, 255) % (num_senders() + num_receivers());
      std::vector<SessionAction> actions;
      if (index < num_senders()) {
        Sender& s = senders_[index];
        faulted_ |= now_ >= s.session.deadline() && !IsFinal(s.session.state());
        s.session.OnDeadline(now_, &actions);
        RunSender(s, std::move(actions));
      } else {
        Receiver& r = receivers_[index - num_senders()];
        faulted_ |= now_ >= r.session.next_deadline() && !IsFinal(r.session.state());
        r.session.OnDeadline(now_, &actions);
        RunReceiver(r, std::move(actions));
      }
      break;
    }
    case ops::kAdvanceTime:
      now_ += absl::Seconds(in.Int(0, 255));
      break;
    case ops::kForge:
      Forge(in);
      break;
  }
  Check();
}

void World::Send(bool to_receiver, int64_t from, int64_t to, const Message& message) {
  // Strangers run no session: what is sent to them goes nowhere.
  if (to >= (to_receiver ? num_receivers() : num_senders())) return;
  packets_.push_back(Packet{to_receiver, from, to, EncodeMessage(message), message});
}

void World::Deliver(const Packet& packet) {
  const absl::StatusOr<Message> decoded = DecodeMessage(packet.bytes);
  if (!decoded.ok()) return;  // the transceiver drops what does not decode
  if (!(*decoded == packet.sent)) lied_ = true;  // corrupted into another message
  std::vector<SessionAction> actions;
  if (packet.to_receiver) {
    Receiver& r = receivers_[packet.to];
    if (!r.started) return;  // no session for the request there yet: dropped
    if (const auto* result = std::get_if<SliceResult>(&*decoded)) {
      if (result->unique_rid != kRid || result->sender_rank != packet.from) return;
      // A final session counts no result (one may come after a sender's Cancel).
      if (!IsFinal(r.session.state())) {
        r.first_result.emplace(PairKey{result->slice_id, packet.from},
                               result->outcome == SliceOutcome::kSuccess || result->settled);
      }
      r.session.OnResult(*result, now_, &actions);
    } else if (const auto* aux = std::get_if<AuxTokens>(&*decoded)) {
      if (aux->unique_rid != kRid || aux->sender_rank != packet.from) return;
      r.session.OnAuxTokens(*aux, now_, &actions);
    } else if (const auto* cancel = std::get_if<Cancel>(&*decoded)) {
      if (cancel->unique_rid != kRid || cancel->sender_rank != packet.from ||
          cancel->from != Role::kContext) {
        return;
      }
      if (r.senders.count(packet.from) > 0 && !IsFinal(r.session.state())) {
        r.released.insert(packet.from);
      }
      r.session.OnSenderCancel(packet.from, cancel->reason, now_, &actions);
    } else {
      return;
    }
    RunReceiver(r, std::move(actions));
    return;
  }
  Sender& s = senders_[packet.to];
  if (const auto* data = std::get_if<RequestData>(&*decoded)) {
    if (data->unique_rid != kRid || data->receiver_rank != packet.from) return;
    if (s.receivers.count(packet.from) > 0) s.asked.insert({data->slice_id, packet.from});
    s.session.OnRequestData(*data, &actions);
  } else if (const auto* cancel = std::get_if<Cancel>(&*decoded)) {
    if (cancel->unique_rid != kRid || cancel->sender_rank != packet.from ||
        cancel->from != Role::kGeneration) {
      return;
    }
    s.session.OnReceiverCancel(packet.from, cancel->reason, &actions);
  } else {
    return;
  }
  RunSender(s, std::move(actions));
}

void World::RunSender(Sender& s, std::vector<SessionAction> actions) {
  // Handling an action may append more (a post to a fenced receiver ends at once).
  for (size_t i = 0; i < actions.size(); ++i) {
    const SessionAction action = actions[i];
    if (const auto* send = std::get_if<SendMessage>(&action)) {
      SenderSent(s, *send);
    } else if (const auto* post = std::get_if<PostSlice>(&action)) {
      const PairKey key{post->slice_id, post->receiver_rank};
      const std::string pair = absl::StrCat("sender=", s.rank, " slice=", key.first,
                                            " receiver=", key.second);
      if (s.receivers.count(key.second) == 0) {
        Broken("PostSlice for a receiver the sender does not overlap: " + pair);
      }
      if (s.cancelled.count(key.second) > 0) {
        Broken("a pair posted after a Cancel to its receiver (invariant 5): " + pair);
      }
      if (!s.transfers.emplace(key, Transfer{}).second) {
        Broken("a pair dispatched twice (invariant 2): " + pair);
      }
      if (s.session.slice(key.first) == nullptr ||
          s.session.request_data(key.first, key.second) == nullptr) {
        Broken("PostSlice without its slice or its request data: " + pair);
      }
      if (receivers_[key.second].fenced.count(s.rank) > 0) {
        // The receiver fenced this sender: the grants the request data names are
        // revoked, and the transceiver's post fails before it writes anything.
        s.transfers[key].state = Write::kFailedSettled;
        s.session.OnSliceEnded(
            key.first, key.second,
            SliceOutcomeInfo{absl::FailedPreconditionError("grants revoked"), true, 0, 0},
            &actions);
      }
    } else if (std::holds_alternative<CancelPosted>(action)) {
      for (auto& [key, t] : s.transfers) t.cancel_asked |= t.state == Write::kInFlight;
    } else {
      Broken(absl::StrCat("a sender asked to fence a rank: sender=", s.rank));
    }
  }
}

void World::SenderSent(Sender& s, const SendMessage& send) {
  const int64_t to = send.peer_rank;
  const std::string where = absl::StrCat("sender=", s.rank, " receiver=", to);
  const bool overlaps = s.receivers.count(to) > 0;
  if (const auto* result = std::get_if<SliceResult>(&send.message)) {
    if (result->unique_rid != kRid || result->sender_rank != s.rank) {
      Broken("a result names another request or rank: " + where);
    }
    const PairKey key{result->slice_id, to};
    const std::string pair = absl::StrCat(where, " slice=", key.first);
    if (!overlaps) {
      if (result->outcome != SliceOutcome::kFailed) {
        Broken("SUCCESS to a receiver the sender does not overlap: " + pair);
      }
    } else {
      if (++s.results[key] > 1) {
        Broken("a second SliceResult for one pair (invariant 3): " + pair);
      }
      const auto t = s.transfers.find(key);
      if (result->outcome == SliceOutcome::kSuccess) {
        if (t == s.transfers.end() || t->second.state != Write::kDelivered) {
          Broken("SUCCESS for writes that were not delivered: " + pair);
        }
      } else if (result->settled && t != s.transfers.end() &&
                 (t->second.state == Write::kInFlight ||
                  t->second.state == Write::kFailedUnsettled)) {
        Broken("a settled FAILED while the pair's writes may still land: " + pair);
      }
    }
  } else if (const auto* aux = std::get_if<AuxTokens>(&send.message)) {
    if (!overlaps) Broken("aux tokens to a receiver the sender does not overlap: " + where);
    if (!s.aux_sent.emplace(to, aux->tokens).second) {
      Broken("aux tokens sent twice to one receiver: " + where);
    }
    for (const auto& [key, t] : s.transfers) {
      if (key.second == to && t.state != Write::kDelivered) {
        Broken(absl::StrCat("aux tokens before the writes were delivered: ", where,
                            " slice=", key.first));
      }
    }
  } else if (const auto* cancel = std::get_if<Cancel>(&send.message)) {
    if (cancel->unique_rid != kRid || cancel->sender_rank != s.rank ||
        cancel->from != Role::kContext) {
      Broken("a cancel names another request, rank or role: " + where);
    }
    for (const auto& [key, t] : s.transfers) {
      if (key.second == to &&
          (t.state == Write::kInFlight || t.state == Write::kFailedUnsettled)) {
        Broken(absl::StrCat("a Cancel while writes to the receiver may still land "
                            "(invariant 5): ", where, " slice=", key.first));
      }
    }
    s.cancelled.insert(to);
  } else {
    Broken(absl::StrCat("a sender sent a ", MessageKindName(send.message), ": ", where));
  }
  Send(/*to_receiver=*/true, s.rank, to, send.message);
}

void World::RunReceiver(Receiver& r, std::vector<SessionAction> actions) {
  for (size_t i = 0; i < actions.size(); ++i) {
    const SessionAction action = actions[i];
    if (const auto* send = std::get_if<SendMessage>(&action)) {
      ReceiverSent(r, *send);
    } else if (const auto* fence = std::get_if<FenceSender>(&action)) {
      const int64_t sender = fence->sender_rank;
      if (r.senders.count(sender) == 0) {
        Broken(absl::StrCat("a receiver fences a rank it does not expect: receiver=", r.rank,
                            " sender=", sender));
      }
      // The transceiver cuts the sender off (transport RemovePeer), then tells each
      // request that still waits on it.
      r.fenced.insert(sender);
      if (r.session.waits_on(sender)) r.session.OnSenderFenced(sender, now_, &actions);
    } else {
      Broken(absl::StrCat("a receiver asked to post or cancel writes: receiver=", r.rank));
    }
  }
}

void World::ReceiverSent(const Receiver& r, const SendMessage& send) {
  const int64_t to = send.peer_rank;
  const std::string where = absl::StrCat("receiver=", r.rank, " sender=", to);
  if (r.senders.count(to) == 0) Broken("a receiver writes to a rank it does not expect: " + where);
  if (const auto* data = std::get_if<RequestData>(&send.message)) {
    if (data->unique_rid != kRid || data->receiver_rank != r.rank) {
      Broken("request data names another request or rank: " + where);
    }
    request_data_[{r.rank, to, data->slice_id}] = *data;
  } else if (const auto* cancel = std::get_if<Cancel>(&send.message)) {
    if (cancel->unique_rid != kRid || cancel->sender_rank != r.rank ||
        cancel->from != Role::kGeneration) {
      Broken("a cancel names another request, rank or role: " + where);
    }
  } else {
    Broken(absl::StrCat("a receiver sent a ", MessageKindName(send.message), ": ", where));
  }
  Send(/*to_receiver=*/false, r.rank, to, send.message);
}

void World::AddSlice(Sender& s, int64_t slice_id, int variant) {
  bool last = slice_id == slices_ - 1;
  std::vector<int64_t> aux = aux_;
  if (slice_id >= slices_ || s.given.count(slice_id) > 0) faulted_ = true;
  if (variant == 3) {
    last = !last;
    faulted_ = true;
  }
  if (variant == 4 && last) {
    aux.push_back(1);  // the context ranks disagree on the tokens
    faulted_ = true;
  }
  s.given.insert(slice_id);
  std::vector<SessionAction> actions;
  const absl::Status added = s.session.AddSlice(slice_id, SliceOf(slice_id, last, 10 * s.rank),
                                                std::move(aux), sender_deadline_, &actions);
  if (!added.ok() && s.session.error().ok()) {
    Broken("AddSlice refused a slice and left the session unfailed: " + added.ToString());
  }
  RunSender(s, std::move(actions));
}

void World::EndTransfer(Sender& s, const PairKey& key, int outcome) {
  Transfer& t = s.transfers.at(key);
  SliceOutcomeInfo info;
  if (outcome == 0 && receivers_[key.second].fenced.count(s.rank) == 0) {
    t.state = Write::kDelivered;
    info.bytes = 64;
    info.writes = 1;
  } else {
    // A fenced receiver's memory cannot be reached any more: nothing lands.
    const bool settled = outcome != 2;
    faulted_ |= outcome != 0;
    t.state = settled ? Write::kFailedSettled : Write::kFailedUnsettled;
    info.status = t.cancel_asked ? absl::AbortedError("write cancelled")
                                 : absl::UnavailableError("write failed");
    info.settled = settled;
  }
  std::vector<SessionAction> actions;
  s.session.OnSliceEnded(key.first, key.second, info, &actions);
  RunSender(s, std::move(actions));
}

void World::SpuriousEnd(Sender& s, const PairKey& key, int outcome) {
  const auto t = s.transfers.find(key);
  if (t != s.transfers.end() && t->second.state == Write::kInFlight) return;
  SliceOutcomeInfo info;
  if (outcome != 0) info = SliceOutcomeInfo{absl::UnavailableError("spurious"), outcome == 1};
  std::vector<SessionAction> actions;
  s.session.OnSliceEnded(key.first, key.second, info, &actions);
  if (!actions.empty()) {
    Broken(absl::StrCat("a sender acted on the end of a pair not in flight: sender=", s.rank,
                        " slice=", key.first, " receiver=", key.second));
  }
}

void World::Start(Receiver& r) {
  // The transceiver starts a request once; one that failed before it never starts.
  if (r.started || IsFinal(r.session.state())) return;
  r.started = true;
  std::map<int64_t, uint64_t> epochs;
  for (int64_t sender : r.senders) epochs[sender] = 1;
  std::vector<SessionAction> actions;
  r.session.Start(epochs, &actions);
  RunReceiver(r, std::move(actions));
}

void World::Forge(FuzzBytes& in) {
  const bool to_receiver = (in.Int(0, 255) & 1) != 0;
  // Any rank of the peer instance, the stranger included.
  const int64_t from = in.Int(0, 255) % ((to_receiver ? num_senders() : num_receivers()) + 1);
  const int64_t to = in.Int(0, 255) % (to_receiver ? num_receivers() : num_senders());
  const int64_t kind = in.Int(0, 2);
  const int64_t slice_id = in.Int(0, 255) % (slices_ + 1);
  const int64_t flags = in.Int(0, 255);
  const bool first = (flags & 1) != 0;
  const int64_t claimed = (flags & 4) != 0 ? from + 1 : from;
  const uint64_t rid = (flags & 8) != 0 ? kRid + 1 : kRid;
  // Routed to the session as a message of this peer rank (else the transceiver
  // drops it).
  const bool routed = (flags & 12) == 0;
  const bool overlaps = to_receiver ? receivers_[to].senders.count(from) > 0
                                    : senders_[to].receivers.count(from) > 0;
  Message message;
  bool cancels = false;
  if (to_receiver) {
    if (kind == 0) {
      SliceResult result;
      result.unique_rid = rid;
      result.slice_id = slice_id;
      result.sender_rank = claimed;
      result.outcome = first ? SliceOutcome::kSuccess : SliceOutcome::kFailed;
      result.is_last_slice = slice_id == slices_ - 1;
      result.code = first ? 0 : static_cast<int32_t>(absl::StatusCode::kUnavailable);
      result.settled = (flags & 2) != 0;
      message = result;
    } else if (kind == 1) {
      AuxTokens aux{rid, claimed, aux_slot_, aux_};
      if ((flags & 16) != 0) aux.tokens = {slice_id};
      message = aux;
    } else {
      message = Cancel{rid, claimed, Role::kContext, "forged"};
      cancels = true;
    }
  } else {
    if (kind == 0) {
      // A replay of what the rank sent, or made up when it sent nothing.
      RequestData data;
      const auto sent = request_data_.find({from, to, slice_id});
      if (sent != request_data_.end()) data = sent->second;
      data.unique_rid = rid;
      data.slice_id = slice_id;
      data.receiver_rank = claimed;
      data.is_last_slice = first;
      if ((flags & 16) != 0) data.block_ids_per_group = {{slice_id}};
      message = data;
    } else {
      // A context rank cannot cancel at a context rank: the second is dropped.
      const Role role = kind == 1 ? Role::kGeneration : Role::kContext;
      message = Cancel{rid, claimed, role, "forged"};
      cancels = role == Role::kGeneration;
    }
  }
  if (routed && (overlaps || cancels)) faulted_ = true;
  // A peer that lies within its own request: the cross-session invariants no
  // longer bind (a stranger is ignored or answered, which no invariant forbids).
  if (routed && overlaps) lied_ = true;
  packets_.push_back(Packet{to_receiver, from, to, EncodeMessage(message), message});
}

// One round of a correct world: the engines give every slice, receivers start, the
// network delivers everything (in order) and writes complete (a cancelled one or
// one to a fenced receiver fails, settled). Returns whether anything happened.
bool World::Settle() {
  bool progress = false;
  for (Sender& s : senders_) {
    for (int64_t k = 0; k < slices_; ++k) {
      if (s.given.count(k) > 0) continue;
      AddSlice(s, k, /*variant=*/0);
      Check();
      progress = true;
    }
  }
  for (Receiver& r : receivers_) {
    if (r.started || IsFinal(r.session.state())) continue;
    Start(r);
    Check();
    progress = true;
  }
  for (size_t deliveries = 0; !packets_.empty(); ++deliveries) {
    if (deliveries == kMaxDeliveries) Broken("sessions never stop sending: " + Describe());
    const Packet packet = std::move(packets_.front());
    packets_.pop_front();
    Deliver(packet);
    Check();
    progress = true;
  }
  for (Sender& s : senders_) {
    std::vector<PairKey> in_flight;
    for (const auto& [key, t] : s.transfers) {
      if (t.state == Write::kInFlight) in_flight.push_back(key);
    }
    for (const PairKey& key : in_flight) {
      const bool fails = s.transfers[key].cancel_asked;
      EndTransfer(s, key, fails ? 1 : 0);
      Check();
      progress = true;
    }
  }
  return progress;
}

bool World::AllFinal() const {
  for (const Sender& s : senders_) {
    if (!IsFinal(s.session.state())) return false;
  }
  for (const Receiver& r : receivers_) {
    if (!IsFinal(r.session.state())) return false;
  }
  return true;
}

void World::Finish() {
  for (int round = 0; round < kSettleRounds && Settle(); ++round) {
  }
  if (!faulted_) {
    for (const Sender& s : senders_) {
      if (s.session.state() != SessionState::kFullyTransferred) {
        Broken("a run without faults did not end FULLY_TRANSFERRED: " + Describe());
      }
    }
    for (const Receiver& r : receivers_) {
      if (r.session.state() != SessionState::kFullyTransferred || r.session.aux_tokens() != aux_) {
        Broken("a run without faults did not end FULLY_TRANSFERRED with the engine's aux "
               "tokens: " + Describe());
      }
    }
  }
  // Time runs on: deadlines, the report grace and fences end whatever is left.
  for (int round = 0; round < kSettleRounds && !AllFinal(); ++round) {
    if (Settle()) continue;
    now_ += absl::Hours(1);
    for (Sender& s : senders_) {
      std::vector<SessionAction> actions;
      s.session.OnDeadline(now_, &actions);
      RunSender(s, std::move(actions));
      Check();
    }
    for (Receiver& r : receivers_) {
      std::vector<SessionAction> actions;
      r.session.OnDeadline(now_, &actions);
      RunReceiver(r, std::move(actions));
      Check();
    }
  }
  if (!AllFinal()) Broken("a request never ends: " + Describe());
}

void World::Check() {
  for (Sender& s : senders_) CheckSender(s);
  for (Receiver& r : receivers_) CheckReceiver(r);
  if (lied_) return;
  for (const Receiver& r : receivers_) CheckDelivery(r);
}

// Forward only, first error kept, the state consistent with the error.
void CheckProgress(SessionState state, const absl::Status& error, Seen* seen,
                   const std::string& who) {
  const std::string change =
      absl::StrCat(who, ": ", StateOf(seen->state, seen->error), " -> ", StateOf(state, error));
  if (IsFinal(seen->state) && state != seen->state) Broken("left a final state: " + change);
  if (Progress(state) < Progress(seen->state)) Broken("moved backwards: " + change);
  if (!seen->error.ok() && error != seen->error) {
    Broken("the first error did not win (invariant 4): " + change);
  }
  if ((state == SessionState::kFullyTransferred && !error.ok()) ||
      (state == SessionState::kError && error.ok()) ||
      (state == SessionState::kCancelled && error.code() != absl::StatusCode::kAborted)) {
    Broken("final state and error disagree: " + change);
  }
  seen->state = state;
  seen->error = error;
}

void World::CheckSender(Sender& s) {
  const std::string who = absl::StrCat("sender=", s.rank);
  CheckProgress(s.session.state(), s.session.error(), &s.seen, who);
  if (!IsFinal(s.session.state())) return;
  for (const auto& [key, t] : s.transfers) {
    if (t.state == Write::kInFlight) {
      Broken(absl::StrCat("final with writes in flight (invariant 1): ", who,
                          " slice=", key.first, " receiver=", key.second, " state=",
                          SessionStateName(s.session.state())));
    }
  }
  for (const PairKey& key : s.asked) {
    const auto sent = s.results.find(key);
    if (sent == s.results.end() || sent->second != 1) {
      Broken(absl::StrCat("final without one SliceResult for a pair it got request data for "
                          "(invariant 3): ", who, " slice=", key.first, " receiver=",
                          key.second, " state=", StateOf(s.session.state(), s.session.error())));
    }
  }
}

void World::CheckReceiver(Receiver& r) {
  CheckProgress(r.session.state(), r.session.error(), &r.seen,
                absl::StrCat("receiver=", r.rank));
  if (!IsFinal(r.session.state())) return;
  if (r.session.next_deadline() != absl::InfiniteFuture()) {
    Broken(absl::StrCat("a final receiver still has a deadline: receiver=", r.rank));
  }
  // Invariant 1 as the receiver knows it, which holds whatever the peers said:
  // every expected sender fenced, or settled for every slice, or done by its own
  // word (a Cancel) with no unsettled result. (One that ended before Start
  // expects no sender.)
  if (!r.started) return;
  for (int64_t sender : r.senders) {
    if (r.fenced.count(sender) > 0) continue;
    const bool released = r.released.count(sender) > 0;
    for (int64_t k = 0; k < slices_; ++k) {
      const auto first = r.first_result.find({k, sender});
      if (first == r.first_result.end() ? !released : !first->second) {
        Broken(absl::StrCat("final without a settled result, a fence or the sender's "
                            "Cancel (invariant 1): receiver=", r.rank, " sender=", sender,
                            " slice=", k, " ", StateOf(r.session.state(), r.session.error())));
      }
    }
  }
}

// What a receiver's state promises about the writes into its pages.
void World::CheckDelivery(const Receiver& r) const {
  const SessionState state = r.session.state();
  for (int64_t sender : r.senders) {
    const Sender& s = senders_[sender];
    for (const auto& [key, t] : s.transfers) {
      if (key.second != r.rank) continue;
      const bool may_land = t.state == Write::kInFlight || t.state == Write::kFailedUnsettled;
      if (IsFinal(state) && may_land && r.fenced.count(sender) == 0) {
        Broken(absl::StrCat("final while a sender may still write into its pages "
                            "(invariant 1): receiver=", r.rank, " sender=", sender,
                            " slice=", key.first, " ", StateOf(state, r.session.error())));
      }
    }
    if (state != SessionState::kKvTransferred && state != SessionState::kFullyTransferred) {
      continue;
    }
    for (int64_t k = 0; k < slices_; ++k) {
      const auto t = s.transfers.find({k, r.rank});
      if (t == s.transfers.end() || t->second.state != Write::kDelivered) {
        Broken(absl::StrCat(SessionStateName(state), " without the writes: receiver=", r.rank,
                            " sender=", sender, " slice=", k));
      }
    }
  }
  if (state == SessionState::kFullyTransferred) {
    bool sent = false;
    for (int64_t sender : r.senders) {
      const auto aux = senders_[sender].aux_sent.find(r.rank);
      sent |= aux != senders_[sender].aux_sent.end() && aux->second == r.session.aux_tokens();
    }
    if (!sent) Broken(absl::StrCat("aux tokens no sender sent: receiver=", r.rank));
  }
}

std::string World::Describe() const {
  std::string out = absl::StrCat("slices=", slices_, " faulted=", faulted_, " lied=", lied_,
                                 " packets=", packets_.size());
  for (const Sender& s : senders_) {
    absl::StrAppend(&out, "; sender ", s.rank, ": ", StateOf(s.session.state(), s.session.error()),
                    " transfers=");
    for (const auto& [key, t] : s.transfers) {
      absl::StrAppend(&out, "(", key.first, ",", key.second, ")=", static_cast<int>(t.state),
                      " ");
    }
  }
  for (const Receiver& r : receivers_) {
    absl::StrAppend(&out, "; receiver ", r.rank, ": ",
                    StateOf(r.session.state(), r.session.error()), " started=", r.started,
                    " fenced=", r.fenced.size());
  }
  return out;
}

}  // namespace
}  // namespace kvx::transfer

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvx::testing::FuzzBytes in(data, size);
  kvx::transfer::World world(in);
  while (!in.empty()) world.Step(in);
  world.Finish();
  return 0;
}
