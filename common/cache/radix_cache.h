// Radix prefix cache over token ids that knows DSV4: a prefix is reusable only up to a page boundary
// where a snapshot of the window and compressor state was kept (see README.md, "Prefix cache").
//
// What is kept where:
//  * token pages (C4 KV, C4 indexer keys, C128 KV of positions below a page boundary): shared, immutable
//    once the boundary is passed; the tree holds one reference per page, each request one of its own.
//  * boundary snapshots (window KV of the last sliding_window positions of every layer, MTP included, and
//    the C4 attention/indexer rings): one per page boundary where a request stood when it was captured;
//    owned by the tree; restored by copying into the new request's own window page and rings.
//  * the C128 ring: nothing; at a page boundary (page_size % 128 == 0) its open chunk is empty.
// A match therefore ends at the longest matched page boundary that has a snapshot, never in between.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "common/cache/pools.h"
#include "common/core/status.h"

namespace tandem::cache {

class RadixCache {
  struct Node;

 public:
  // Opaque reference to a tree node, valid while it is locked.
  class NodeRef {
   public:
    NodeRef() = default;
    bool valid() const { return node_ != nullptr; }

   private:
    friend class RadixCache;
    explicit NodeRef(Node* node) : node_(node) {}
    Node* node_ = nullptr;
  };

  struct Match {
    int64_t tokens = 0;          // reusable length: a page boundary with a snapshot (0: nothing to reuse)
    int64_t matched_tokens = 0;  // longest page-aligned match, restorable or not
    std::vector<PageId> pages;   // token pages covering [0, tokens)
    BoundarySnapshot snapshot;   // the state at `tokens` (owned by the cache; copy it, do not release it)
    NodeRef node;                // lock it while the pages are in use
  };

  struct EvictResult {
    int64_t nodes = 0;
    int64_t token_pages_freed = 0;
    int64_t window_pages_freed = 0;
  };

  struct Stats {
    int64_t nodes = 0;            // without the root
    int64_t cached_tokens = 0;
    int64_t cached_pages = 0;
    int64_t snapshots = 0;
    int64_t locked_nodes = 0;
  };

  // The pools must outlive the cache; the cache must outlive every lock taken on it.
  explicit RadixCache(StatePools* pools);
  ~RadixCache();
  RadixCache(const RadixCache&) = delete;
  RadixCache& operator=(const RadixCache&) = delete;

  // Longest reusable prefix of `tokens`. Callers pass the prompt without its last token, so at least one
  // token is left to compute the first logits from. Refreshes the matched nodes' LRU time.
  Match MatchPrefix(std::span<const int32_t> tokens);

  // Pins a node and its ancestors against eviction.
  void Lock(NodeRef node);
  absl::Status Unlock(NodeRef node);

  // Caches `tokens` (whole pages) with their token pages and any boundary snapshots the request captured.
  // The tree takes its own page references for pages it adopts (the caller keeps and later releases its
  // own); snapshots are taken over: kept where the tree lacks one, released otherwise. Returns the number
  // of tokens newly cached. Invalid arguments change nothing and release nothing.
  absl::StatusOr<int64_t> Insert(std::span<const int32_t> tokens, std::span<const PageId> pages,
                                 std::vector<BoundarySnapshot> snapshots);

  // Evicts least recently used unlocked leaves, returning their pages and snapshots to the pools, until
  // the token-page and window-page pools have at least the given number of free pages or nothing unlocked
  // is left.
  EvictResult Evict(int64_t min_free_token_pages, int64_t min_free_window_pages = 0);

  Stats stats() const;
  int64_t page_size() const { return page_size_; }

 private:
  struct PageLess {
    using is_transparent = void;
    bool operator()(std::span<const int32_t> a, std::span<const int32_t> b) const;
  };
  struct Node {
    Node* parent = nullptr;
    std::vector<int32_t> tokens;  // whole pages
    std::vector<PageId> pages;    // one per page of tokens
    std::vector<std::optional<BoundarySnapshot>> snapshots;  // [k]: state after page k of this node
    std::map<std::vector<int32_t>, std::unique_ptr<Node>, PageLess> children;  // keyed by their first page
    int lock_ref = 0;
    uint64_t last_access = 0;
    int64_t num_pages() const { return static_cast<int64_t>(pages.size()); }
  };

  std::span<const int32_t> page_of(std::span<const int32_t> tokens, int64_t page) const;
  Node* FindChild(Node* node, std::span<const int32_t> first_page);
  int64_t MatchingPages(const Node& node, std::span<const int32_t> tokens, int64_t first_page) const;
  Node* Split(Node* node, int64_t pages);
  void ReleaseNode(Node& node);
  void ReleaseSubtree(Node& node);

  StatePools* pools_;
  int64_t page_size_;
  std::unique_ptr<Node> root_;
  uint64_t clock_ = 0;
};

}  // namespace tandem::cache
