#include "common/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <system_error>
#include <tuple>
#include <utility>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

namespace tandem::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr const char* kIndexName = "model.safetensors.index.json";

std::string ErrnoText(int error_number) { return std::generic_category().message(error_number); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&out, i ? ", " : "", shape[i]);
  return out + "]";
}

// absl::StrCat takes absl::string_view, which this abseil build does not alias to std::string_view.
std::string DTypeString(DType dtype) { return std::string(DTypeName(dtype)); }

std::string OffsetsString(uint64_t begin, uint64_t end) { return absl::StrCat("[", begin, ", ", end, "]"); }

// A short rendering of a JSON value for error messages (headers can hold huge arrays).
std::string Excerpt(const json& value) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

// numel(shape) x itemsize, or nullopt on a negative dimension or 64-bit overflow.
std::optional<uint64_t> ByteSize(DType dtype, const std::vector<int64_t>& shape) {
  uint64_t bytes = DTypeSize(dtype);
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes)) return std::nullopt;
  }
  return bytes;
}

// Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF). Returns the offset of the
// first bad byte, or nullopt when the text is valid.
std::optional<size_t> FindInvalidUtf8(const uint8_t* text, size_t size) {
  size_t i = 0;
  while (i < size) {
    const uint8_t lead = text[i];
    size_t length;
    uint32_t min_code;
    uint32_t code;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xe0) == 0xc0) {
      length = 2, min_code = 0x80, code = lead & 0x1f;
    } else if ((lead & 0xf0) == 0xe0) {
      length = 3, min_code = 0x800, code = lead & 0x0f;
    } else if ((lead & 0xf8) == 0xf0) {
      length = 4, min_code = 0x10000, code = lead & 0x07;
    } else {
      return i;
    }
    if (size - i < length) return i;
    for (size_t k = 1; k < length; ++k) {
      if ((text[i + k] & 0xc0) != 0x80) return i;
      code = (code << 6) | (text[i + k] & 0x3f);
    }
    if (code < min_code || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return i;
    i += length;
  }
  return std::nullopt;
}

// A non-negative JSON integer, or nullopt.
std::optional<uint64_t> AsUnsigned(const json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0) return static_cast<uint64_t>(value.get<int64_t>());
  return std::nullopt;
}

absl::Status ParseTensorEntry(const std::string& path, const std::string& name, const json& entry, uint64_t data_size,
                              TensorInfo* info) {
  const std::string where = absl::StrCat(path, ": tensor ", name, ": ");
  if (!entry.is_object()) return absl::InvalidArgumentError(where + "header entry is not an object");
  const auto dtype_it = entry.find("dtype");
  const auto shape_it = entry.find("shape");
  const auto offsets_it = entry.find("data_offsets");
  if (dtype_it == entry.end() || shape_it == entry.end() || offsets_it == entry.end()) {
    return absl::InvalidArgumentError(where + "header entry needs dtype, shape and data_offsets");
  }
  if (!dtype_it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "dtype is not a string: ", Excerpt(*dtype_it)));
  }
  const std::string dtype_name = dtype_it->get<std::string>();
  const std::optional<DType> dtype = DTypeFromName(dtype_name);
  if (!dtype) return absl::InvalidArgumentError(absl::StrCat(where, "unknown dtype \"", dtype_name, "\""));

  std::vector<int64_t> shape;
  bool shape_ok = shape_it->is_array();
  if (shape_ok) {
    for (const json& dim : *shape_it) {
      const std::optional<uint64_t> value = AsUnsigned(dim);
      if (!value || *value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        shape_ok = false;
        break;
      }
      shape.push_back(static_cast<int64_t>(*value));
    }
  }
  if (!shape_ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "shape must be a list of non-negative integers, got ", Excerpt(*shape_it)));
  }

  std::optional<uint64_t> begin, end;
  if (offsets_it->is_array() && offsets_it->size() == 2) {
    begin = AsUnsigned((*offsets_it)[0]);
    end = AsUnsigned((*offsets_it)[1]);
  }
  if (!begin || !end) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "data_offsets must be two non-negative integers, got ", Excerpt(*offsets_it)));
  }
  if (*begin > *end) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "data_offsets ", OffsetsString(*begin, *end), " end before they begin"));
  }
  const std::optional<uint64_t> bytes = ByteSize(*dtype, shape);
  if (!bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "dtype ", dtype_name, " x shape ", ShapeString(shape), " overflows 64 bits"));
  }
  if (*bytes != *end - *begin) {
    return absl::InvalidArgumentError(absl::StrCat(where, "dtype ", dtype_name, " x shape ", ShapeString(shape), " = ",
                                                   *bytes, " bytes but data_offsets span ", *end - *begin));
  }
  if (*end > data_size) {
    return absl::InvalidArgumentError(absl::StrCat(where, "data_offsets ", OffsetsString(*begin, *end),
                                                   " run past the end of the data buffer (", data_size,
                                                   " bytes; file truncated?)"));
  }
  *info = TensorInfo{name, *dtype, std::move(shape), *begin, *end};
  return absl::OkStatus();
}

// Sorted by begin offset, the tensors must cover [0, data_size) exactly once.
absl::Status CheckTiling(const std::string& path, const std::map<std::string, TensorInfo>& tensors,
                         uint64_t data_size) {
  std::vector<const TensorInfo*> order;
  order.reserve(tensors.size());
  for (const auto& [name, info] : tensors) order.push_back(&info);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  uint64_t cursor = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo* info : order) {
    if (info->begin < cursor) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", info->name, ": data_offsets ", OffsetsString(info->begin, info->end),
                       " overlap tensor ", previous->name, " ", OffsetsString(previous->begin, previous->end)));
    }
    if (info->begin > cursor) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor ", info->name, ": hole of ", info->begin - cursor, " unused bytes in the data buffer ",
          OffsetsString(cursor, info->begin), previous ? " after tensor " + previous->name : " before it"));
    }
    cursor = info->end;
    previous = info;
  }
  if (cursor != data_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": hole of ", data_size - cursor, " unused bytes at the end of the data buffer ",
                     OffsetsString(cursor, data_size), previous ? " after tensor " + previous->name : ""));
  }
  return absl::OkStatus();
}

struct ParsedHeader {
  uint64_t data_start = 0;
  std::map<std::string, TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};

absl::Status ParseHeader(const std::string& path, const uint8_t* base, uint64_t file_size, ParsedHeader* out) {
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | base[i];
  if (header_size > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", header_size, " exceeds the 100 MiB limit (not a safetensors file?)"));
  }
  if (header_size > file_size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_size, " runs past the end of the ",
                                                   file_size, "-byte file (truncated?)"));
  }
  const uint8_t* header = base + 8;
  if (const std::optional<size_t> bad = FindInvalidUtf8(header, header_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header is not valid UTF-8 (byte ", *bad, " of the header)"));
  }
  const json root = json::parse(header, header + header_size, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": header is not valid JSON"));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header JSON is ", root.type_name(), ", expected an object"));
  }
  out->data_start = 8 + header_size;
  const uint64_t data_size = file_size - out->data_start;
  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ is not an object"));
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": __metadata__ value for \"", meta_key, "\" is not a string: ", Excerpt(meta_value)));
        }
        out->metadata[meta_key] = meta_value.get<std::string>();
      }
      continue;
    }
    TensorInfo info;
    TANDEM_RETURN_IF_ERROR(ParseTensorEntry(path, key, value, data_size, &info));
    out->tensors.emplace(key, std::move(info));
  }
  return CheckTiling(path, out->tensors, data_size);
}

void DropPageCache(const std::string& path) {
  static std::atomic<bool> logged{false};
  std::string why;
#if defined(POSIX_FADV_DONTNEED)
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    why = absl::StrCat("open: ", ErrnoText(errno));
  } else {
    const int rc = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
    if (rc == 0) return;
    why = absl::StrCat("posix_fadvise(DONTNEED): ", ErrnoText(rc));
  }
#else
  why = "posix_fadvise(POSIX_FADV_DONTNEED) is not available on this platform";
#endif
  if (!logged.exchange(true)) {
    spdlog::info("{}: could not drop the page cache after loading ({}); the pages stay cached until evicted", path,
                 why);
  }
}

absl::Status WriteAll(std::FILE* file, const void* data, size_t size) {
  if (size != 0 && std::fwrite(data, 1, size, file) != size) return absl::InternalError(ErrnoText(errno));
  return absl::OkStatus();
}

std::string ShardName(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", index, count);
  return name;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// SafetensorsFile

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  try {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int error_number = errno;
      const std::string message = absl::StrCat(path, ": cannot open: ", ErrnoText(error_number));
      return error_number == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int error_number = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": fstat: ", ErrnoText(error_number)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
    }
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    if (size < 8) {
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": file is ", size, " bytes, too short for the 8-byte header length (truncated?)"));
    }
    void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_errno = errno;
    ::close(fd);
    if (mapping == MAP_FAILED) return absl::InternalError(absl::StrCat(path, ": mmap: ", ErrnoText(map_errno)));

    std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
    file->path_ = path;
    file->file_size_ = size;
    file->base_ = static_cast<const uint8_t*>(mapping);
    ParsedHeader header;
    TANDEM_RETURN_IF_ERROR(ParseHeader(path, file->base_, size, &header));
    file->data_start_ = header.data_start;
    file->tensors_ = std::move(header.tensors);
    file->metadata_ = std::move(header.metadata);
    return file;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(path, ": ", e.what()));
  }
}

SafetensorsFile::~SafetensorsFile() { Unmap(/*drop_cache=*/false); }

absl::StatusOr<std::span<const uint8_t>> SafetensorsFile::Data(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat(path_, ": tensor ", name, " missing"));
  if (base_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": tensor ", name, ": file is no longer mapped"));
  }
  return std::span<const uint8_t>(base_ + data_start_ + it->second.begin, it->second.end - it->second.begin);
}

void SafetensorsFile::Unmap(bool drop_cache) {
  if (base_ != nullptr) {
    ::munmap(const_cast<uint8_t*>(base_), file_size_);
    base_ = nullptr;
  }
  // Pages still mapped anywhere are not dropped, hence after munmap.
  if (drop_cache) DropPageCache(path_);
}

// ---------------------------------------------------------------------------------------------------
// Checkpoint

struct Checkpoint::Shard {
  std::unique_ptr<SafetensorsFile> file;
  std::set<std::string> pending;  // tensors the checkpoint reads from this shard, not loaded yet
};

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir, CheckpointOptions options) {
  try {
    std::error_code error;
    const fs::file_status status = fs::status(dir, error);
    if (error || !fs::exists(status)) {
      return absl::NotFoundError(absl::StrCat(dir, ": checkpoint directory does not exist"));
    }
    if (!fs::is_directory(status)) return absl::InvalidArgumentError(absl::StrCat(dir, ": not a directory"));

    std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
    checkpoint->dir_ = dir;
    checkpoint->options_ = options;
    const fs::path root(dir);
    const std::string index_path = (root / kIndexName).string();

    // shard file name -> tensors the checkpoint takes from it (without an index: filled once opened).
    std::map<std::string, std::vector<std::string>> wanted;
    const bool indexed = fs::exists(index_path, error);
    if (indexed) {
      std::ifstream in(index_path, std::ios::binary);
      std::stringstream text;
      text << in.rdbuf();
      if (!in) return absl::InternalError(absl::StrCat(index_path, ": cannot read"));
      const json index = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
      if (index.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(index_path, ": not valid JSON"));
      if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": expected an object with a weight_map object"));
      }
      if (index.contains("metadata") && !index["metadata"].is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": metadata is not an object"));
      }
      for (const auto& [tensor, shard] : index["weight_map"].items()) {
        if (!shard.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(index_path, ": weight_map entry for tensor ", tensor, " is not a file name"));
        }
        const fs::path shard_path(shard.get<std::string>());
        if (shard_path.empty() || shard_path.is_absolute() ||
            std::find(shard_path.begin(), shard_path.end(), "..") != shard_path.end()) {
          return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor ", tensor, " maps to shard \"",
                                                         shard_path.string(), "\" outside the checkpoint directory"));
        }
        wanted[shard_path.string()].push_back(tensor);
      }
      if (wanted.empty()) return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map is empty"));
    } else {
      for (fs::directory_iterator it(root, error), end; !error && it != end; it.increment(error)) {
        if (it->path().extension() == ".safetensors" && it->is_regular_file(error)) {
          wanted[it->path().filename().string()];
        }
      }
      if (error) return absl::InternalError(absl::StrCat(dir, ": cannot list: ", error.message()));
      if (wanted.empty()) {
        return absl::NotFoundError(absl::StrCat(dir, ": no .safetensors files and no ", kIndexName));
      }
    }

    for (auto& [shard_name, tensors] : wanted) {
      const std::string path = (root / shard_name).string();
      if (indexed && !fs::exists(path, error)) {
        return absl::NotFoundError(
            absl::StrCat(index_path, ": shard ", shard_name, " (holding tensor ", tensors.front(), ") does not exist"));
      }
      TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
      auto shard = std::make_unique<Shard>();
      if (!indexed) {
        for (const auto& [name, info] : file->tensors()) tensors.push_back(name);
      }
      const size_t shard_index = checkpoint->shards_.size();
      for (const std::string& name : tensors) {
        const auto info = file->tensors().find(name);
        if (info == file->tensors().end()) {
          return absl::NotFoundError(absl::StrCat(index_path, ": tensor ", name, " is mapped to shard ", shard_name,
                                                  ", but ", path, " has no tensor ", name));
        }
        const auto [existing, inserted] = checkpoint->tensor_shard_.emplace(name, shard_index);
        if (!inserted) {
          return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor ", name, " is in both ",
                                                         checkpoint->shards_[existing->second]->file->path(), " and ",
                                                         path));
        }
        shard->pending.insert(name);
        checkpoint->total_bytes_ += info->second.end - info->second.begin;
      }
      // A shard nothing is read from is released right away.
      if (shard->pending.empty()) file->Unmap(options.drop_cache_after_load);
      shard->file = std::move(file);
      checkpoint->shards_.push_back(std::move(shard));
    }
    return checkpoint;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(dir, ": ", e.what()));
  }
}

Checkpoint::~Checkpoint() { Finish(); }

bool Checkpoint::Has(const std::string& name) const { return tensor_shard_.count(name) != 0; }

absl::StatusOr<TensorInfo> Checkpoint::Info(const std::string& name) const {
  const auto it = tensor_shard_.find(name);
  if (it == tensor_shard_.end()) return absl::NotFoundError(absl::StrCat(dir_, ": tensor ", name, " missing"));
  return shards_[it->second]->file->tensors().at(name);
}

absl::StatusOr<Tensor> Checkpoint::Load(const std::string& name, DType dtype, const std::vector<int64_t>& shape) {
  try {
    const auto it = tensor_shard_.find(name);
    if (it == tensor_shard_.end()) {
      return absl::NotFoundError(absl::StrCat(dir_, ": tensor ", name, " missing from the checkpoint"));
    }
    Shard& shard = *shards_[it->second];
    const TensorInfo& info = shard.file->tensors().at(name);
    if (info.dtype != dtype || info.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(shard.file->path(), ": tensor ", name, ": expected dtype ",
                                                     DTypeString(dtype), " shape ", ShapeString(shape), ", found ",
                                                     DTypeString(info.dtype), " ", ShapeString(info.shape)));
    }
    if (!shard.file->mapped()) {
      return absl::FailedPreconditionError(absl::StrCat(
          shard.file->path(), ": tensor ", name, ": shard already released (tensor loaded twice, or after Finish())"));
    }
    TANDEM_ASSIGN_OR_RETURN(const std::span<const uint8_t> bytes, shard.file->Data(name));
    Tensor tensor(dtype, shape);
    if (tensor.bytes() != bytes.size()) {
      return absl::InternalError(absl::StrCat(shard.file->path(), ": tensor ", name, ": size mismatch"));
    }
    if (!bytes.empty()) std::memcpy(tensor.data(), bytes.data(), bytes.size());

    if (shard.pending.erase(name) != 0) {
      const uint64_t before = total_bytes_ ? loaded_bytes_ * 100 / total_bytes_ : 100;
      loaded_bytes_ += bytes.size();
      const uint64_t after = total_bytes_ ? loaded_bytes_ * 100 / total_bytes_ : 100;
      if (after != before || last_progress_decile_ < 0) ReportProgress();
      if (shard.pending.empty()) shard.file->Unmap(options_.drop_cache_after_load);
    }
    return tensor;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(dir_, ": tensor ", name, ": ", e.what()));
  }
}

void Checkpoint::ReportProgress() {
  if (!options_.show_progress || total_bytes_ == 0) return;
  const double loaded_mb = static_cast<double>(loaded_bytes_) / 1e6;
  const double total_mb = static_cast<double>(total_bytes_) / 1e6;
  const int percent = static_cast<int>(loaded_bytes_ * 100 / total_bytes_);
  const int decile = percent / 10;
  if (::isatty(STDERR_FILENO)) {
    constexpr int kWidth = 30;
    const int filled = percent * kWidth / 100;
    std::fprintf(stderr, "\rloading weights [%s%s] %3d%%  %.1f / %.1f MB", std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, ' ').c_str(), percent, loaded_mb, total_mb);
    if (percent == 100) std::fputc('\n', stderr);
    std::fflush(stderr);
  } else if (decile > last_progress_decile_ && decile > 0) {
    spdlog::info("loading weights: {}% ({:.1f} / {:.1f} MB)", decile * 10, loaded_mb, total_mb);
  }
  last_progress_decile_ = std::max(last_progress_decile_, decile);
}

void Checkpoint::Finish() {
  for (auto& shard : shards_) {
    if (shard->file->mapped()) shard->file->Unmap(options_.drop_cache_after_load);
  }
  // End an unfinished progress bar so later output starts on its own line.
  if (options_.show_progress && last_progress_decile_ >= 0 && loaded_bytes_ < total_bytes_ && ::isatty(STDERR_FILENO)) {
    std::fputc('\n', stderr);
    last_progress_decile_ = -1;
  }
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(tensor_shard_.size());
  for (const auto& [name, shard] : tensor_shard_) names.push_back(name);
  return names;
}

std::vector<std::string> Checkpoint::FilePaths() const {
  std::vector<std::string> paths;
  for (const auto& shard : shards_) paths.push_back(shard->file->path());
  return paths;
}

// ---------------------------------------------------------------------------------------------------
// Writing

void SafetensorsWriter::Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::vector<uint8_t> bytes) {
  if (!error_.ok()) return;
  const std::optional<uint64_t> expected = ByteSize(dtype, shape);
  if (!expected) {
    error_ = absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": shape ", ShapeString(shape),
                                                     " has a negative dimension or overflows 64 bits"));
  } else if (*expected != bytes.size()) {
    error_ = absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": dtype ", DTypeString(dtype), " x shape ",
                                                     ShapeString(shape), " = ", *expected, " bytes but ", bytes.size(),
                                                     " bytes were given"));
  } else if (name == "__metadata__" ||
             std::any_of(entries_.begin(), entries_.end(), [&](const Entry& entry) { return entry.name == name; })) {
    error_ = absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": name used twice or reserved"));
  } else {
    entries_.push_back(Entry{name, dtype, std::move(shape), std::move(bytes)});
  }
}

void SafetensorsWriter::Add(const std::string& name, const Tensor& tensor) {
  const std::span<const uint8_t> raw = tensor.raw();
  Add(name, tensor.dtype(), tensor.shape(), std::vector<uint8_t>(raw.begin(), raw.end()));
}

size_t SafetensorsWriter::pending_bytes() const {
  size_t total = 0;
  for (const Entry& entry : entries_) total += entry.bytes.size();
  return total;
}

std::vector<std::string> SafetensorsWriter::names() const {
  std::vector<std::string> out;
  for (const Entry& entry : entries_) out.push_back(entry.name);
  return out;
}

absl::Status SafetensorsWriter::Write(const std::string& path, const std::map<std::string, std::string>& metadata) {
  std::vector<Entry> entries = std::move(entries_);
  absl::Status error = std::move(error_);
  entries_.clear();
  error_ = absl::OkStatus();
  if (!error.ok()) return absl::Status(error.code(), absl::StrCat(path, ": ", error.message()));
  try {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    uint64_t offset = 0;
    for (const Entry& entry : entries) {
      header[entry.name] = {{"dtype", std::string(DTypeName(entry.dtype))},
                            {"shape", entry.shape},
                            {"data_offsets", {offset, offset + entry.bytes.size()}}};
      offset += entry.bytes.size();
    }
    std::string text;
    try {
      text = header.dump();
    } catch (const nlohmann::json::exception&) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor names and metadata must be valid UTF-8"));
    }
    // Padding keeps the data buffer 8-byte aligned in the file.
    text.append((8 - text.size() % 8) % 8, ' ');
    uint8_t length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));

    std::FILE* file = std::fopen(path.c_str(), "wb");
    if (file == nullptr) return absl::InternalError(absl::StrCat(path, ": cannot create: ", ErrnoText(errno)));
    absl::Status status = WriteAll(file, length, sizeof(length));
    if (status.ok()) status = WriteAll(file, text.data(), text.size());
    for (const Entry& entry : entries) {
      if (status.ok()) status = WriteAll(file, entry.bytes.data(), entry.bytes.size());
    }
    if (std::fclose(file) != 0 && status.ok()) status = absl::InternalError(ErrnoText(errno));
    if (!status.ok()) return absl::InternalError(absl::StrCat(path, ": write failed: ", status.message()));
    return absl::OkStatus();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(path, ": ", e.what()));
  }
}

absl::Status WriteShardedCheckpoint(const std::string& dir, std::vector<std::pair<std::string, Tensor>> tensors,
                                    uint64_t shard_bytes) {
  try {
    if (tensors.empty()) return absl::InvalidArgumentError(absl::StrCat(dir, ": no tensors to write"));
    std::error_code error;
    fs::create_directories(dir, error);
    if (error) return absl::InternalError(absl::StrCat(dir, ": cannot create directory: ", error.message()));

    // Greedy in order: a shard takes tensors while it stays within shard_bytes; an oversized tensor
    // ends up alone.
    std::vector<std::vector<size_t>> groups;
    uint64_t group_bytes = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const uint64_t bytes = tensors[i].second.bytes();
      if (groups.empty() || group_bytes > shard_bytes || bytes > shard_bytes - group_bytes) {
        groups.emplace_back();
        group_bytes = 0;
      }
      groups.back().push_back(i);
      group_bytes += bytes;
    }

    json weight_map = json::object();
    uint64_t total_size = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      const std::string shard_name = ShardName(g + 1, groups.size());
      SafetensorsWriter writer;
      for (size_t i : groups[g]) {
        const auto& [name, tensor] = tensors[i];
        if (weight_map.contains(name)) {
          return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor ", name, " given twice"));
        }
        writer.Add(name, tensor);
        weight_map[name] = shard_name;
        total_size += tensor.bytes();
      }
      TANDEM_RETURN_IF_ERROR(writer.Write((fs::path(dir) / shard_name).string()));
    }

    const json index = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
    const std::string index_path = (fs::path(dir) / kIndexName).string();
    std::ofstream out(index_path, std::ios::binary | std::ios::trunc);
    out << index.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    out.close();
    if (!out) return absl::InternalError(absl::StrCat(index_path, ": write failed"));
    return absl::OkStatus();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(dir, ": ", e.what()));
  }
}

}  // namespace tandem::model
