// The worker's side of the shared-memory hand-off for one staging area (see
// omniserve_sgl/worker/staging.py for the words and their protocol).
#pragma once

#include <torch/types.h>

#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "host_ops.h"

namespace omniserve {

class DoorbellLoop {
 public:
  enum Code : int64_t { kIdle = 0, kReply = 1, kPython = 2 };

  // slots[i]: slot i's tensors in the order of `fields`, which must be the staging area's field names
  // (job, done, watch, q, k, v, out, lse, kv_indptr, kv_indices, kv_last_page_len) with `job_fields`,
  // `done_fields` and `watch_fields` its word names: checked here, so the two sides cannot drift.
  // handled: float64 [num_slots], the last job seq run per slot, shared with the Python worker.
  DoorbellLoop(const std::vector<std::vector<torch::Tensor>>& slots, const std::vector<std::string>& fields,
               const std::vector<std::string>& job_fields, const std::vector<std::string>& done_fields,
               const std::vector<std::string>& watch_fields, std::vector<torch::Tensor> k_caches,
               std::vector<torch::Tensor> v_caches, std::string kv_layout, torch::Tensor handled, double margin_s);

  std::tuple<int64_t, int64_t, double, double, double> serve(double until, double slice_s, double spin_s);
  int64_t plans_made() const { return plans_made_; }  // page tables checked and split so far

 private:
  struct Slot {
    double* job;
    double* done;
    double* watch;
    std::vector<torch::Tensor> words;  // job, done, watch: held so their memory stays mapped
    std::vector<torch::Tensor> t;      // q, k, v, out, lse, kv_indptr, kv_indices, kv_last_page_len
  };
  const std::vector<torch::Tensor>& views(int64_t slot, int64_t rows, int64_t pages);
  void publish_polling_until(double until);
  const DecodePlan& plan(double plan_id, const std::vector<torch::Tensor>& views);

  std::vector<Slot> slots_;
  std::vector<torch::Tensor> k_caches_, v_caches_;
  std::string layout_;
  torch::Tensor handled_;
  double margin_s_;
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::vector<torch::Tensor>> views_;
  int64_t num_pages_ = 0, page_size_ = 0;  // of every layer's cache
  std::map<double, DecodePlan> plans_;     // by the client's plan id (job word plan_id), oldest first
  DecodePlan scratch_;                     // the plan of a job without a plan id
  int64_t plans_made_ = 0;
};

}  // namespace omniserve
