#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <sys/uio.h>

#include <cerrno>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "transport/internal/write_engine.h"
#include "transport/libfabric/internal/fabric_endpoint.h"

namespace kvx::libfabric_internal {

absl::StatusOr<bool> FabricEndpoint::PostWrite(const transport_internal::PostedWrite& write,
                                               void* context) {
  iovec iov{const_cast<char*>(write.local), write.length};
  void* desc = write.local_desc;
  fi_rma_iov rma{write.remote_address, write.length, write.remote_key};
  fi_msg_rma msg = {};
  msg.msg_iov = &iov;
  msg.desc = &desc;
  msg.iov_count = 1;
  msg.addr = static_cast<fi_addr_t>(write.peer);
  msg.rma_iov = &rma;
  msg.rma_iov_count = 1;
  msg.context = context;
  // A plain completion on tcp means "sent", not "delivered" (notes, item 2): the last
  // write of a transfer, posted after the others completed, asks for delivery.
  const uint64_t flags = FI_COMPLETION | (write.deliver_complete ? FI_DELIVERY_COMPLETE : 0);
  const ssize_t ret = fi_writemsg(ep_, &msg, flags);
  if (ret == 0) return true;
  if (ret == -FI_EAGAIN) return false;  // Queue full or connecting: progress, retry.
  return FabricError(absl::StrCat("fi_writemsg length=", write.length), static_cast<int>(ret));
}

namespace {

// Errors with which tcp (and rxm above it) reports a connection that is gone, in
// err or prov_errno (libfabric 1.17: ENOTCONN with prov_errno EPIPE, or ECANCELED
// with prov_errno ENOTCONN). rxm keeps such a connection until its event queue
// reports a shutdown, which a peer's fi_av_remove does not always cause: every
// later write to the peer would fail the same way.
bool IsConnectionLost(int error) {
  switch (error) {
    case ENOTCONN:
    case EPIPE:
    case ECONNRESET:
    case ECONNABORTED:
    case ESHUTDOWN:
      return true;
    default:
      return false;
  }
}

}  // namespace

void FabricEndpoint::Poll(std::vector<transport_internal::Completion>* completions) {
  fi_cq_entry entries[64];
  for (;;) {
    const ssize_t n = fi_cq_read(cq_, entries, 64);
    if (n > 0) {
      for (ssize_t i = 0; i < n; ++i) {
        completions->push_back({entries[i].op_context, absl::OkStatus()});
      }
      if (n < 64) return;
      continue;
    }
    if (n != -FI_EAVAIL) return;  // -FI_EAGAIN: nothing yet.
    fi_cq_err_entry err = {};
    if (fi_cq_readerr(cq_, &err, 0) <= 0) return;
    if (err.op_context == nullptr) continue;  // Not one of our writes.
    char buf[256] = {};
    const char* provider_text = fi_cq_strerror(cq_, err.prov_errno, err.err_data, buf, sizeof(buf));
    absl::Status status = FabricError(
        absl::StrCat("completion error: prov_errno=", err.prov_errno, " provider_says=\"",
                     provider_text != nullptr ? provider_text : "", "\""),
        -err.err);
    completions->push_back({err.op_context, std::move(status),
                            IsConnectionLost(err.err) || IsConnectionLost(err.prov_errno)});
  }
}

}  // namespace kvx::libfabric_internal
