#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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

absl::StatusOr<transport_internal::BackendPeer> FabricEndpoint::InsertPeer(
    absl::string_view raw_name) {
  fi_addr_t addr = FI_ADDR_UNSPEC;
  const int ret = fi_av_insert(av_, raw_name.data(), 1, &addr, 0, nullptr);
  // Returns the number inserted (notes, item 7).
  if (ret != 1) return FabricError("fi_av_insert", ret == 0 ? -FI_EINVAL : ret);
  char printable[256] = {};
  size_t len = sizeof(printable);
  fi_av_straddr(av_, raw_name.data(), printable, &len);
  return transport_internal::BackendPeer{static_cast<uint64_t>(addr), std::string(printable)};
}

}  // namespace kvx::libfabric_internal
