// Do not include directly: the input format of transfer/session_fuzzer.cc, shared
// with the generator of its seeds (transfer/fuzz_seeds_main.cc).
//
// An input is a world, then events until the input ends. Every value is one byte
// (testing::FuzzBytes: a choice in [lo, hi] reads one byte b and is lo + b % (hi -
// lo + 1)); a byte past the end reads as 0.
//
// World:
//   senders - 1 (0..2), receivers - 1 (0..1), slices - 1 (0..2);
//   per sender: the receivers it overlaps, a bit mask (0 reads as "all"; a
//     receiver no sender overlaps is given to sender receiver % senders);
//   sender deadline, receiver deadline: seconds after the start (1..256);
//   aux tokens: a count (0..3), then each token (0..255);
//   the receivers' aux slot: 0..3, or 4 for none.
// Context ranks 0..senders-1 and generation ranks 0..receivers-1 run a session;
// rank `senders` of the context instance and rank `receivers` of the generation
// instance exist but overlap no one (strangers).
//
// Events: an Op, then its operands, each one byte (an index is taken modulo the
// number of candidates; an event without candidates does nothing).

#ifndef KVX_TRANSFER_INTERNAL_SESSION_FUZZ_OPS_H_
#define KVX_TRANSFER_INTERNAL_SESSION_FUZZ_OPS_H_

#include <cstdint>

namespace kvx::transfer_internal::session_fuzz {

inline constexpr int kMaxSenders = 3;
inline constexpr int kMaxReceivers = 2;
inline constexpr int kMaxSlices = 3;

enum Op : uint8_t {
  // The network: packets in flight, in the order they were sent.
  kDeliver,     // packet: delivered (any packet: reordering)
  kDuplicate,   // packet: sent twice
  kDrop,        // packet: lost
  kTruncate,    // packet, length: cut to length % size bytes
  kBadVersion,  // packet: its version byte becomes an unknown version
  kFlipByte,    // packet, position, mask: one byte xor (mask | 1)
  // The engines and the transport.
  kAddSlice,        // sender, slice (slices: one past the last), variant (3: is_last_slice
                    // flipped, 4: other aux tokens; else as the engine would)
  kEndTransfer,     // sender, posted pair, outcome (0 delivered, 1 failed settled,
                    // 2 failed unsettled)
  kSpuriousEnd,     // sender, slice, receiver, outcome: a pair that is not in flight
  kStartReceiver,   // receiver: the engine's request; sends the request data
  kCancelSender,    // sender: its engine cancels
  kCancelReceiver,  // receiver: its engine cancels
  kFailReceiver,    // receiver: the transceiver fails it (e.g. no sender overlaps)
  kDeadline,        // session (senders first, then receivers): OnDeadline(now)
  kAdvanceTime,     // seconds
  // A message no session sent: from any rank (strangers too) to any session.
  kForge,  // to_receiver (bit 0), from, to, kind (0..2), slice, flags:
           //   to a sender: RequestData, Cancel, Cancel claiming the context role;
           //   to a receiver: SliceResult, AuxTokens, Cancel;
           //   flags: 1 last slice / success, 2 settled, 4 claims another rank,
           //          8 another request, 16 other tokens or blocks
  kNumOps,
};

}  // namespace kvx::transfer_internal::session_fuzz

#endif  // KVX_TRANSFER_INTERNAL_SESSION_FUZZ_OPS_H_
