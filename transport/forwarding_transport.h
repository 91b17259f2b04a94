// File: transport/forwarding_transport.h
//
// A Transport that hands every call to another: the base of a decorator that
// changes one or two calls (a test's misbehaving transport, a tracer) and keeps
// the rest of the contract of the transport it wraps.
//
//   class Counting final : public kvx::transport::ForwardingTransport {
//    public:
//     using ForwardingTransport::ForwardingTransport;
//     absl::StatusOr<TransferId> PostWrites(PeerId peer, absl::Span<const WriteOp> writes,
//                                           absl::Time deadline) override {
//       posted_ += writes.size();
//       return inner().PostWrites(peer, writes, deadline);
//     }
//    private:
//     size_t posted_ = 0;
//   };
//
// Thread safety: as the wrapped transport's.

#ifndef KVX_TRANSPORT_FORWARDING_TRANSPORT_H_
#define KVX_TRANSPORT_FORWARDING_TRANSPORT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/transport.h"

namespace kvx::transport {

class ForwardingTransport : public Transport {
 public:
  // REQUIRES: `inner` is not null.
  explicit ForwardingTransport(std::unique_ptr<Transport> inner) : inner_(std::move(inner)) {}

  Transport& inner() { return *inner_; }

  Capabilities capabilities() const override { return inner_->capabilities(); }
  std::string address() const override { return inner_->address(); }
  absl::StatusOr<RegionId> RegisterMemory(void* base, uint64_t length,
                                          MemoryKind kind = MemoryKind::kHost) override {
    return inner_->RegisterMemory(base, length, kind);
  }
  absl::Status DeregisterMemory(RegionId region) override {
    return inner_->DeregisterMemory(region);
  }
  absl::StatusOr<PeerId> AddPeer(absl::string_view address) override {
    return inner_->AddPeer(address);
  }
  absl::Status RemovePeer(PeerId peer) override { return inner_->RemovePeer(peer); }
  absl::StatusOr<RegionDescriptor> GrantRemoteWrite(RegionId region, PeerId peer) override {
    return inner_->GrantRemoteWrite(region, peer);
  }
  absl::StatusOr<TransferId> PostWrites(PeerId peer, absl::Span<const WriteOp> writes,
                                        absl::Time deadline) override {
    return inner_->PostWrites(peer, writes, deadline);
  }
  absl::Status CancelTransfer(TransferId id) override { return inner_->CancelTransfer(id); }
  absl::StatusOr<TransferStatus> PollTransfer(TransferId id) override {
    return inner_->PollTransfer(id);
  }
  absl::StatusOr<TransferStatus> WaitTransfer(TransferId id, absl::Time wait_deadline) override {
    return inner_->WaitTransfer(id, wait_deadline);
  }

 private:
  const std::unique_ptr<Transport> inner_;
};

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_FORWARDING_TRANSPORT_H_
