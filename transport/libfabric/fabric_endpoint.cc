#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>

#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "transport/internal/mutex.h"
#include "transport/internal/write_engine.h"
#include "transport/libfabric/internal/fabric_endpoint.h"

namespace kvx::libfabric_internal {

absl::StatusOr<std::unique_ptr<FabricEndpoint>> FabricEndpoint::Open(InfoPtr info,
                                                                     int64_t cq_size) {
  // The destructor closes whatever was opened if a later step fails.
  std::unique_ptr<FabricEndpoint> e(new FabricEndpoint(std::move(info)));
  fi_info* fi = e->info_.get();
  int ret = fi_fabric(fi->fabric_attr, &e->fabric_, nullptr);
  if (ret != 0) return FabricError("fi_fabric", ret);
  ret = fi_domain(e->fabric_, fi, &e->domain_, nullptr);
  if (ret != 0) return FabricError("fi_domain", ret);

  fi_cq_attr cq_attr = {};
  cq_attr.size = static_cast<size_t>(std::max<int64_t>(cq_size, 1024));
  cq_attr.format = FI_CQ_FORMAT_CONTEXT;
  // Spin on fi_cq_read: shm's wait objects fail or hang (notes, item 6).
  cq_attr.wait_obj = FI_WAIT_NONE;
  ret = fi_cq_open(e->domain_, &cq_attr, &e->cq_, nullptr);
  if (ret != 0) return FabricError("fi_cq_open", ret);

  fi_av_attr av_attr = {};
  av_attr.type = FI_AV_TABLE;
  ret = fi_av_open(e->domain_, &av_attr, &e->av_, nullptr);
  if (ret != 0) return FabricError("fi_av_open", ret);

  ret = fi_endpoint(e->domain_, fi, &e->ep_, nullptr);
  if (ret != 0) return FabricError("fi_endpoint", ret);
  ret = fi_ep_bind(e->ep_, &e->av_->fid, 0);
  if (ret != 0) return FabricError("fi_ep_bind(av)", ret);
  ret = fi_ep_bind(e->ep_, &e->cq_->fid, FI_TRANSMIT | FI_RECV);
  if (ret != 0) return FabricError("fi_ep_bind(cq)", ret);
  ret = fi_enable(e->ep_);
  if (ret != 0) return FabricError("fi_enable", ret);

  char name[256];
  size_t name_len = sizeof(name);
  ret = fi_getname(&e->ep_->fid, name, &name_len);
  if (ret != 0) return FabricError("fi_getname", ret);
  e->raw_name_.assign(name, name_len);
  return e;
}

FabricEndpoint::~FabricEndpoint() {
  // Endpoint first (it cancels what is in flight), then the regions bound to the
  // domain, then the rest in reverse order of opening.
  if (ep_ != nullptr) fi_close(&ep_->fid);
  {
    transport_internal::MutexLock lock(&mrs_mu_);
    for (fid_mr* mr : mrs_) fi_close(&mr->fid);
    mrs_.clear();
  }
  if (av_ != nullptr) fi_close(&av_->fid);
  if (cq_ != nullptr) fi_close(&cq_->fid);
  if (domain_ != nullptr) fi_close(&domain_->fid);
  if (fabric_ != nullptr) fi_close(&fabric_->fid);
}

namespace {

// Why `raw` cannot be an address of `format`, or empty if it can. fi_av_insert reads
// as many bytes as the format implies, whatever length it is given, so this runs
// before it ever sees untrusted bytes.
std::string CheckAddressFormat(uint32_t format, absl::string_view raw,
                               size_t own_length) {
  auto family_of = [&raw]() {
    sa_family_t family = 0;
    std::memcpy(&family, raw.data(), sizeof(family));
    return family;
  };
  switch (format) {
    case FI_SOCKADDR_IN: {
      if (raw.size() != sizeof(sockaddr_in)) {
        return absl::StrCat("sockaddr_in must be ", sizeof(sockaddr_in), " bytes");
      }
      sockaddr_in in;
      std::memcpy(&in, raw.data(), sizeof(in));
      if (in.sin_family != AF_INET) return "sockaddr_in family is not AF_INET";
      if (in.sin_port == 0) return "sockaddr_in port is 0";
      return "";
    }
    case FI_SOCKADDR_IN6: {
      if (raw.size() != sizeof(sockaddr_in6)) {
        return absl::StrCat("sockaddr_in6 must be ", sizeof(sockaddr_in6), " bytes");
      }
      if (family_of() != AF_INET6) return "sockaddr_in6 family is not AF_INET6";
      return "";
    }
    case FI_ADDR_STR: {
      if (raw.size() < 2 || raw.size() > 256) return "string address must be 2 to 256 bytes";
      if (raw.back() != '\0') return "string address is not NUL-terminated";
      const absl::string_view text = raw.substr(0, raw.size() - 1);
      for (char c : text) {
        if (c < 0x20 || c > 0x7e) return "string address has a non-printable byte";
      }
      if (!absl::StartsWith(text, "fi_shm://") && !absl::StartsWith(text, "fi_ns://")) {
        return "string address has no fi_shm:// or fi_ns:// prefix";
      }
      return "";
    }
    default:
      // Same provider, same format: a fixed-size address as long as our own.
      if (raw.size() != own_length) {
        return absl::StrCat("address must be ", own_length, " bytes like ours");
      }
      return "";
  }
}

}  // namespace

absl::StatusOr<transport_internal::BackendPeer> FabricEndpoint::InsertPeer(
    absl::string_view raw_name) {
  const std::string why = CheckAddressFormat(info_->addr_format, raw_name, raw_name_.size());
  if (!why.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("malformed peer address: ", why,
                                                    ": size=", raw_name.size(),
                                                    " addr_format=", info_->addr_format));
  }
  fi_addr_t addr = FI_ADDR_UNSPEC;
  const int ret = fi_av_insert(av_, raw_name.data(), 1, &addr, 0, nullptr);
  // Returns the number inserted (notes, item 7).
  if (ret != 1) return FabricError("fi_av_insert", ret == 0 ? -FI_EINVAL : ret);
  char printable[256] = {};
  size_t len = sizeof(printable) - 1;
  fi_av_straddr(av_, raw_name.data(), printable, &len);
  return transport_internal::BackendPeer{static_cast<uint64_t>(addr), std::string(printable),
                                         std::string(raw_name)};
}

bool FabricEndpoint::CanDropConnections() const {
  // shm's fi_av_remove unmaps the peer's region from ours even while the peer still
  // talks to us (libfabric 1.17, smr_av_remove): its next command then names a slot
  // we no longer map. shm has no connection to drop anyway; a write lands only when
  // our own progress copies it, after checking its key.
  return std::string_view(info_->fabric_attr->prov_name) != "shm";
}

void FabricEndpoint::RemovePeer(uint64_t handle) {
  if (!CanDropConnections()) return;
  fi_addr_t addr = static_cast<fi_addr_t>(handle);
  fi_av_remove(av_, &addr, 1, 0);
}

absl::StatusOr<uint64_t> FabricEndpoint::ResetPeer(const transport_internal::BackendPeer& peer) {
  if (!CanDropConnections()) return peer.handle;
  RemovePeer(peer.handle);
  fi_addr_t addr = FI_ADDR_UNSPEC;
  const int ret = fi_av_insert(av_, peer.raw.data(), 1, &addr, 0, nullptr);
  if (ret != 1) return FabricError("fi_av_insert", ret == 0 ? -FI_EINVAL : ret);
  return static_cast<uint64_t>(addr);
}

}  // namespace kvx::libfabric_internal
