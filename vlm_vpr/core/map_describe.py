"""Map-side data for the VLM re-rankers, computed once and stored as map extras.

- :func:`describe_map`: VLM scene descriptions of every map thumbnail and their Sentence-BERT
  embeddings, stored with the VLM name, the prompt and the embedder, so that a query costs one
  VLM call (``descriptions`` re-ranker).
- :func:`build_regions`: k-means regions on the map positions, each with a short label taken
  from the descriptions or given by the user (``region`` re-ranker). Cheap; no VLM needed.

```
extras/vlm_descriptions.json            model, prompt, embedder, per-image texts and weights,
                                        failed and stale images, SHA-256 of the two arrays
extras/vlm_description_embeddings.npy   [M x E] float32, L2-normalised, one row per description
extras/vlm_description_owners.npy       [M] int32, map index of each row (ascending)
extras/vlm_regions.json                 labels, centres, where the labels came from
extras/vlm_region_of_image.npy          [N] int32, region of each map image
```

(Each file's name carries a digest of its bytes, e.g. ``vlm_regions.<digest>.json``; the
manifest names the current one, see :func:`vlm_vpr.core.map_format.write_extras`.)
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_vpr.core.config import RerankConfig, VlmConfig
from vlm_vpr.core.errors import ConfigError, MapError, VlmError
from vlm_vpr.core.map_format import VprMap, read_map, write_extras

if TYPE_CHECKING:
    from vlm_vpr.backends.text_embedding import TextEmbedder
    from vlm_vpr.backends.vlm import VlmClient

log = logging.getLogger(__name__)

DESCRIPTIONS_EXTRA = 'vlm_descriptions'
DESCRIPTION_EMBEDDINGS_EXTRA = 'vlm_description_embeddings'
DESCRIPTION_OWNERS_EXTRA = 'vlm_description_owners'
REGIONS_EXTRA = 'vlm_regions'
REGION_OF_IMAGE_EXTRA = 'vlm_region_of_image'
LABEL_TEXTS = 2  # most central descriptions joined into a region label
KMEANS_ITERATIONS = 50
SAVE_EVERY = 20  # images described between two stores of `map describe` progress


@dataclass
class MapDescriptions:
    """The stored descriptions of a map; ``texts[j]`` may be empty (description failed)."""

    model: str  # VLM that wrote them
    prompt: str
    text_embedder: str
    texts: list[list[str]]  # per map image
    weights: list[list[float]]  # per map image, each list sums to 1
    embeddings: np.ndarray  # [M x E] float32, L2-normalised, rows grouped by map image
    owners: np.ndarray  # [M] int32 map index of each row, ascending


@dataclass
class MapRegions:
    """k-means regions of the map positions."""

    labels: list[str]  # one per region
    centres_xy: np.ndarray  # [R x 2] float64, map frame
    region_of_image: np.ndarray  # [N] int32


def describe_map(
    map_dir: str | Path,
    vlm: VlmConfig,
    rerank: RerankConfig,
    client: VlmClient | None = None,
    embedder: TextEmbedder | None = None,
) -> Path:
    """Describe every map thumbnail with the VLM, embed the texts, store both in the map.

    ``client`` / ``embedder`` default to the ones ``vlm`` and ``rerank.text_embedder`` name.
    Resumable: progress is stored every SAVE_EVERY images and when the run ends or stops. A
    re-run skips the images that already have texts from the same VLM (``client.model_name``)
    and prompt (which holds ``rerank.num_descriptions``), both stored, and only embeds their
    texts again. An image whose description fails (VlmError or no usable text) is logged and
    listed as ``failed``; it keeps its earlier texts, if any, listed as ``stale`` until a run
    describes it. VlmError if every image tried fails. Returns the map folder.
    """
    from vlm_vpr.backends.text_embedding import TextEmbedder
    from vlm_vpr.backends.vlm import VlmOutputError, create_vlm_client
    from vlm_vpr.backends.vlm.tasks import describe_image, describe_prompt

    vpr_map = read_map(map_dir, load_index=False)
    if not vpr_map.manifest.get('thumbnails'):
        raise MapError(
            f'map {vpr_map.path} has no thumbnails to describe; rebuild it with '
            'thumbnail_size_px > 0'
        )
    embedder = embedder or TextEmbedder(rerank.text_embedder)  # before the VLM, which loads longer
    client = client or create_vlm_client(vlm)
    timeout_s = vlm.timeout_s * (vlm.retries + 1)
    prompt = describe_prompt(rerank.num_descriptions)
    per_image, stale = _earlier_descriptions(vpr_map, client.model_name, prompt)
    counts = np.cumsum([len(descriptions) for descriptions in per_image])[:-1]
    vectors = np.split(embedder.embed([str(d['text']) for ds in per_image for d in ds]), counts)
    todo = [j for j, descriptions in enumerate(per_image) if not descriptions or j in stale]
    failed: list[int] = []
    first_error = ''

    def save() -> None:
        if any(per_image):
            meta: dict[str, object] = {
                'model': client.model_name,
                'prompt': prompt,
                'text_embedder': embedder.model_name,
                'failed': failed,
                'stale': sorted(stale),
            }
            _save_descriptions(vpr_map.path, meta, per_image, vectors)

    start = time.monotonic()
    try:
        for done, j in enumerate(todo, 1):
            image = vpr_map.thumbnail(j)
            if image is None:
                raise MapError(f'thumbnail {j} of map {vpr_map.path} is missing; rebuild the map')
            try:
                described = describe_image(client, image, rerank.num_descriptions, timeout_s)
                if not described:
                    raise VlmOutputError('the VLM gave no usable description')
            except VlmError as exc:
                name = vpr_map.content.image_names[j]
                log.warning('map image %d (%s): description failed: %s', j, name, exc)
                failed.append(j)
                first_error = first_error or str(exc)
            else:
                vectors[j] = embedder.embed([d.text for d in described])  # may fail: first
                per_image[j] = [{'text': d.text, 'weight': d.weight} for d in described]
                stale.discard(j)
            if done % SAVE_EVERY == 0:
                elapsed = time.monotonic() - start
                log.info('described %d / %d map images (%.1f s)', done, len(todo), elapsed)
                if done < len(todo):  # the last batch is saved below
                    save()
    finally:
        save()
    if todo and len(failed) == len(todo):
        raise VlmError(
            f'all {len(todo)} map images failed to be described (first error: '
            f'{first_error}); check the VLM with one image first'
        )
    log.info(
        'described %d map images (%d failed, %d kept from earlier runs) in %.1f s',
        len(todo),
        len(failed),
        len(per_image) - len(todo),
        time.monotonic() - start,
    )
    return vpr_map.path


def _earlier_descriptions(
    vpr_map: VprMap, model: str, prompt: str
) -> tuple[list[list[dict[str, float | str]]], set[int]]:
    """Per map image, the descriptions an earlier `map describe` stored, and the images among
    them to describe again: all if they came from another VLM or prompt, else the stale ones."""
    try:
        meta = vpr_map.read_extra_json(DESCRIPTIONS_EXTRA)
        if meta is None:
            return [[] for _ in range(len(vpr_map))], set()
        per_image: list[list[dict[str, float | str]]] = [
            [{'text': str(d['text']), 'weight': float(d['weight'])} for d in descriptions]
            for descriptions in meta['images']
        ]
        if len(per_image) != len(vpr_map):
            raise ValueError(f'{len(per_image)} images, the map has {len(vpr_map)}')
        if (meta['model'], meta['prompt']) == (model, prompt):
            return per_image, {int(j) for j in meta.get('stale', [])}
        return per_image, {j for j, descriptions in enumerate(per_image) if descriptions}
    except (MapError, KeyError, TypeError, ValueError) as exc:
        log.warning('ignoring the stored descriptions of %s (%s)', vpr_map.path, exc)
        return [[] for _ in range(len(vpr_map))], set()


def _save_descriptions(
    map_dir: Path,
    meta: dict[str, object],
    per_image: list[list[dict[str, float | str]]],
    vectors: list[np.ndarray],
) -> None:
    """Store the rows and the JSON that names their digest, committed together. A reader of
    rows and texts that do not belong together (a crash could leave them so before extras
    were committed together) gets a MapError, not texts beside other texts' embeddings."""
    embeddings = np.concatenate(vectors).astype(np.float32)
    owners = _owners(per_image)
    json_meta = meta | {
        'embedding_dim': int(embeddings.shape[1]),
        'rows_sha256': _rows_digest(embeddings, owners),
        'images': per_image,
    }
    write_extras(
        map_dir,
        {
            DESCRIPTION_EMBEDDINGS_EXTRA: embeddings,
            DESCRIPTION_OWNERS_EXTRA: owners,
            DESCRIPTIONS_EXTRA: json_meta,
        },
    )


def _owners(per_image: list[list[Any]]) -> np.ndarray:
    """[R] int32: the map image of each description row (image j has len(per_image[j]))."""
    return np.array([j for j, rows in enumerate(per_image) for _ in rows], dtype=np.int32)


def _rows_digest(embeddings: np.ndarray, owners: np.ndarray) -> str:
    """SHA-256 of the float32 embeddings and int32 owners, tying them to their JSON."""
    digest = hashlib.sha256(np.ascontiguousarray(embeddings, np.float32).tobytes())
    digest.update(np.ascontiguousarray(owners, np.int32).tobytes())
    return digest.hexdigest()


def load_map_descriptions(vpr_map: VprMap) -> MapDescriptions | None:
    """The map's stored descriptions, None if it has none; MapError if inconsistent."""
    meta = vpr_map.read_extra_json(DESCRIPTIONS_EXTRA)
    if meta is None:
        return None
    embeddings = vpr_map.read_extra_array(DESCRIPTION_EMBEDDINGS_EXTRA)
    owners = vpr_map.read_extra_array(DESCRIPTION_OWNERS_EXTRA)
    try:
        images = meta['images']
        texts = [[str(d['text']) for d in descriptions] for descriptions in images]
        weights = [[float(d['weight']) for d in descriptions] for descriptions in images]
        result = MapDescriptions(
            str(meta['model']),
            str(meta['prompt']),
            str(meta['text_embedder']),
            texts,
            weights,
            np.asarray(embeddings, np.float32),
            np.asarray(owners, np.int32),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MapError(
            f'map descriptions of {vpr_map.path} are invalid ({exc}); run '
            '`vlm-vpr map describe` again'
        ) from exc
    expected = _owners(texts)
    if (
        len(texts) != len(vpr_map)
        or result.embeddings.ndim != 2
        or len(result.embeddings) != len(expected)
        or not np.array_equal(result.owners, expected)
    ):
        raise MapError(
            f'map descriptions of {vpr_map.path} do not match the map (other image '
            'count or missing rows); run `vlm-vpr map describe` again'
        )
    if 'rows_sha256' not in meta:
        raise MapError(
            f'map descriptions of {vpr_map.path} were written by an older vlm_vpr; run '
            '`vlm-vpr map describe` again (it keeps the texts and embeds them again)'
        )
    if meta['rows_sha256'] != _rows_digest(result.embeddings, result.owners):
        raise MapError(
            f'map description texts and embeddings of {vpr_map.path} were not written '
            'together (edited by hand, or a write interrupted before extras were committed '
            'together); run `vlm-vpr map describe` again (it keeps '
            'the texts and embeds them again)'
        )
    return result


def build_regions(map_dir: str | Path, count: int, names: list[str] | None = None) -> Path:
    """Cluster the map positions into at most ``count`` regions and store them with labels.

    Labels are ``names`` (one per region, regions numbered in route order: region 0 holds map
    image 0) or, without names, the most central map descriptions of each region. Returns the
    map folder.
    """
    if names is not None and len(set(names)) != len(names):
        raise ConfigError(f'region names must be distinct, got {names}')
    vpr_map = read_map(map_dir, load_index=False)
    region_of_image, centres = cluster_positions(vpr_map.positions_xyz[:, :2], count)
    num_regions = len(centres)
    if names:
        if len(names) != num_regions:
            raise ConfigError(
                f'{len(names)} region names given for {num_regions} regions; give '
                f'exactly {num_regions} (in route order)'
            )
        labels, source = [str(n) for n in names], 'user'
    else:
        descriptions = load_map_descriptions(vpr_map)
        if descriptions is None:
            raise ConfigError(
                f'map {vpr_map.path} has no descriptions to label regions with: '
                'run `vlm-vpr map describe` first or give region names'
            )
        labels = _labels_from_descriptions(descriptions, region_of_image, num_regions)
        source = 'descriptions'
    write_extras(
        vpr_map.path,
        {
            REGION_OF_IMAGE_EXTRA: region_of_image,
            REGIONS_EXTRA: {
                'labels': labels,
                'label_source': source,
                'centres_xy': centres.tolist(),
            },
        },
    )
    log.info('stored %d regions for map %s (labels from %s)', num_regions, vpr_map.path, source)
    return vpr_map.path


def load_regions(vpr_map: VprMap) -> MapRegions | None:
    """The map's stored regions, None if it has none; MapError if inconsistent."""
    meta = vpr_map.read_extra_json(REGIONS_EXTRA)
    if meta is None:
        return None
    region_of_image = vpr_map.read_extra_array(REGION_OF_IMAGE_EXTRA)
    try:
        labels = [str(label) for label in meta['labels']]
        centres = np.asarray(meta['centres_xy'], dtype=np.float64).reshape(len(labels), 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise MapError(
            f'map regions of {vpr_map.path} are invalid ({exc}); run `vlm-vpr map regions` again'
        ) from exc
    if (
        region_of_image is None
        or region_of_image.shape != (len(vpr_map),)
        or region_of_image.min() < 0
        or region_of_image.max() >= len(labels)
    ):
        raise MapError(
            f'map regions of {vpr_map.path} do not match the map; run `vlm-vpr map regions` again'
        )
    return MapRegions(labels, centres, region_of_image.astype(np.int32))


def region_ids(vpr_map: VprMap, label: str) -> np.ndarray:
    """Map ids of the region named ``label`` (a submap for search); MapError names the labels."""
    regions = load_regions(vpr_map)
    if regions is None:
        raise MapError(f'{vpr_map.path} has no regions; run `vlm-vpr map regions` first')
    if label not in regions.labels:
        raise MapError(f'no region {label!r} in {vpr_map.path}; regions: {regions.labels}')
    return np.flatnonzero(regions.region_of_image == regions.labels.index(label))


def cluster_positions(xy: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means (k-means++ start) of positions [N x 2] into at most ``count`` non-empty regions.

    Returns (region of each position [N] int32, centres [R x 2] float64); regions are numbered
    in order of their first member, so region 0 holds position 0.
    """
    if count < 1:
        raise ConfigError(f'region count must be >= 1, got {count}')
    xy = np.asarray(xy, dtype=np.float64)
    k = min(count, len(np.unique(xy, axis=0)))
    rng = np.random.default_rng(seed)
    centres = xy[[rng.integers(len(xy))]]
    while len(centres) < k:
        d2 = _squared_distances(xy, centres).min(axis=1)
        centres = np.vstack([centres, xy[rng.choice(len(xy), p=d2 / d2.sum())]])
    for _ in range(KMEANS_ITERATIONS):
        assignment = _squared_distances(xy, centres).argmin(axis=1)
        updated = np.array(
            [
                xy[assignment == r].mean(axis=0) if np.any(assignment == r) else centres[r]
                for r in range(k)
            ]
        )
        if np.allclose(updated, centres):
            break
        centres = updated
    assignment = _squared_distances(xy, centres).argmin(axis=1)
    _, first_member = np.unique(assignment, return_index=True)
    order = assignment[np.sort(first_member)]  # old region ids in route order, non-empty only
    renumber = np.full(k, -1, dtype=np.int32)
    renumber[order] = np.arange(len(order), dtype=np.int32)
    return renumber[assignment], centres[order]


def _squared_distances(xy: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[N x R] squared distances between positions [N x 2] and centres [R x 2] (>= 0)."""
    d2 = (xy * xy).sum(1)[:, None] - 2.0 * xy @ centres.T + (centres * centres).sum(1)[None]
    return np.maximum(d2, 0.0)


def _labels_from_descriptions(
    descriptions: MapDescriptions, region_of_image: np.ndarray, num_regions: int
) -> list[str]:
    """Per region, the LABEL_TEXTS descriptions closest to the region's weighted mean
    embedding, preferring texts no earlier region uses."""
    weights = np.array([w for ws in descriptions.weights for w in ws], dtype=np.float32)
    texts = [t for ts in descriptions.texts for t in ts]
    row_region = region_of_image[descriptions.owners]
    used: set[str] = set()
    labels = []
    for r in range(num_regions):
        rows = np.flatnonzero(row_region == r)
        if len(rows) == 0:
            labels.append('(no description)')
            continue
        mean = weights[rows] @ descriptions.embeddings[rows]
        ranked = [
            texts[i]
            for i in rows[np.argsort(-(descriptions.embeddings[rows] @ mean), kind='stable')]
        ]
        distinct = list(dict.fromkeys(ranked))
        chosen = sorted(distinct, key=lambda text: text in used)[:LABEL_TEXTS]
        used.update(chosen)
        labels.append('; '.join(chosen))
    return labels
