"""The export steps chained, each handing its folder to the next (what quantize.py --compile runs),
and what of them is written during GPTQ's layer walk."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from vcu128.export.compile_sw import STEP as COMPILE_SW
from vcu128.export.compile_sw import (
    compile_software,
    output_bytes,
    write_qweight,
    write_scales_and_bias,
)
from vcu128.export.embedding_tokens import split_embedding
from vcu128.export.hardware import BoardOptions, format_assumptions, pack_hardware
from vcu128.export.hardware import output_bytes as packed_bytes
from vcu128.export.lm_head import (
    WrittenAhead,
    lm_head_files,
    quantize_lm_head,
    rtn_blocks,
    write_lm_head,
)
from vcu128.export.packing import PackedAhead, free_bytes, linear_job, output_layer_job
from vcu128.format.checkpoint import TensorView, check_finite
from vcu128.format.gate import read_model_dims
from vcu128.format.layout import (
    BOARD_EMBEDDING_PARTS,
    BOARD_PORTS,
    EMBEDDING_DIR,
    hw_linear_stems,
    sw_linear_paths,
)
from vcu128.format.model import EMBEDDING, LINEARS, LM_HEAD
from vcu128.io.errors import one_line
from vcu128.io.output import out_path, remove_created, stage_tag
from vcu128.io.parallel import in_background, ordered_map

log = logging.getLogger("vcu128")


class ExportPrewriter:
    """What of the export is written while GPTQ quantizes the model (quantize.py --compile): a
    layerwise.ShardSink, called with each checkpoint shard's tensors as they are written.

    - each decoder layer's compile_sw qweight.bin files (27 GB of a 7B's 40), into `compile/`:
      compile_software(qweights_from=...) renames them into its stage instead of writing them. The
      fp16 rescaling plan, known only after GPTQ, multiplies scales, biases and the embedding, never
      the ints: those compile_sw writes as ever.
    - the output layer's lm_head.py files (rtn or trunc of the checkpoint's float output layer, whose
      shard is written before the layers), into `lm_head/`, on a thread of its own: quantize_lm_head
      (ahead=...) renames them into place where they are what it would write.
    - with `board` (ports, int4 code), every linear packed in the board's layout, into `hardware/`
      (packing.PackedAhead), from those files and each layer's scales and biases as compile_sw
      writes them unscaled: pack_hardware(ahead=...) takes a linear's files where its own inputs are
      those very files (the ints renamed into place, scales and biases the same bytes: no fp16
      rescaling), and packs the others itself.

    The folder is a staging path of the checkpoint's target, beside it: on the same filesystem as
    the checkpoint's compile folder, and a run killed with it there has it removed by the next
    quantize.py on that target (output.remove_stale). `remove()` always removes it. An error here
    does not fail GPTQ: the step concerned writes its files itself afterwards, as it does alone."""

    def __init__(self, checkpoint: Path, model: Path, lm_head: tuple[str, int] | None = None, board: tuple[int, str] | None = None):
        """`lm_head`: (method, grid) lm_head.py will use (None: it takes GPTQ's output layer);
        `board`: (ports, int4 code) hardware.py will pack with (None: nothing is packed ahead)."""
        target = out_path(checkpoint)
        self.folder = target.parent / f".{target.name}.partial-{stage_tag()}@{COMPILE_SW}"
        self.created = [p for p in target.parents if not os.path.lexists(p)]  # staged_dir makes them; emptied, they go too
        self.model = Path(model)
        self.lm_head = lm_head
        self.dims = None
        self.layers: set[int] = set()
        self.failed: Exception | None = None  # writing the layers' files
        self.lm_head_job: Future | None = None
        self.stopping = threading.Event()
        self.made = False  # the folder is removed only where this run created it
        self.board = board
        self.packed: PackedAhead | None = None
        self.packing: list[Future] = []  # each layer's linears packed, one layer after another
        self.output_packing: list[Future] = []  # the output layer's
        self.packer: ThreadPoolExecutor | None = None
        self.pack_failed: Exception | None = None

    def __call__(self, index: int, tensors: dict) -> None:
        if self.failed is not None:
            return
        try:
            if self.dims is None:
                self._start()
            if index < self.dims.num_layers:
                self._write_layer(index, tensors)
            elif self.lm_head is not None:  # only the output layer is kept: the embedding beside it goes with its shard
                source = EMBEDDING if self.dims.tie_word_embeddings else f"{LM_HEAD}.weight"  # GPTQCheckpoint.lm_head_source's choice
                self.lm_head_job = in_background(self._write_lm_head, source, tensors[TensorView({}, self.dims, self.folder).source_name(source)])
        except Exception as e:  # noqa: BLE001 - compile_sw writes the files after GPTQ instead (and meets the error there)
            self.failed = e
            self.pack_failed = self.pack_failed or e  # what was packed came from files about to go
            if self.made:
                shutil.rmtree(self.folder / "compile", ignore_errors=True)
            if not isinstance(e, NoRoom):
                log.warning(one_line(f"warning: compile_sw's qweight.bin files could not be written during GPTQ ({e}); "
                                     "compile_sw writes them after it"))

    def _start(self) -> None:
        dims = read_model_dims(self.model / "config.json")
        free = free_bytes(self.folder.parent)
        if free < output_bytes(dims):  # compile_sw refuses it after GPTQ, as it does alone
            raise NoRoom()
        if self.board is not None and free < output_bytes(dims) + packed_bytes(dims, self.board[0]):
            self.board = None  # room for compile_sw's files only: hardware.py packs after GPTQ, as it does alone
        self.folder.mkdir()  # exists already: refused here, and left alone
        self.made = True
        self.dims = dims
        if self.board is not None:
            self.packed = PackedAhead(self.folder / "hardware", *self.board)
            self.packer = ThreadPoolExecutor(1, thread_name_prefix="pack-ahead")

    def _write_layer(self, layer: int, tensors: dict) -> None:
        view = TensorView({}, self.dims, self.folder)
        part = lambda name: view.part_of(name, tensors[view.source_name(name)].numpy())  # noqa: E731

        def linear(lin) -> None:
            name = lin.name(layer)
            paths = sw_linear_paths(self.folder / "compile", name, self.dims.family.software)
            paths["qweight"].parent.mkdir(parents=True, exist_ok=True)
            write_qweight(part(f"{name}.qweight"), paths["qweight"])
            if self.packed is not None:  # compile_sw's scales and bias files, unscaled: what the packing reads
                bias = f"{name}.bias"
                write_scales_and_bias(part(f"{name}.scales"), part(bias) if view.source_name(bias) in tensors else None, paths)

        for _ in ordered_map(linear, LINEARS, ahead=2, workers=2):  # two at a time, as compile_software
            pass
        self.layers.add(layer)
        if self.packed is not None:
            software, dims = self.dims.family.software, self.dims
            self._pack_later([linear_job(self.folder / "compile", lin.name(layer), *dims.linear_shape(lin), hw_linear_stems(layer, lin), software)
                              for lin in LINEARS], self.packing)

    def _pack_later(self, jobs, queue: list[Future]) -> None:
        """The board's files of `jobs`, packed on the packing thread (behind the writing of the next
        layers' files); an error there leaves hardware.py to pack every linear itself."""

        def pack() -> None:
            if self.stopping.is_set() or self.pack_failed is not None:
                return
            try:
                self.packed.pack(jobs)
            except Exception as e:  # noqa: BLE001 - hardware.py packs them after GPTQ instead (and meets the error there)
                self._pack_error(e)

        queue.append(self.packer.submit(pack))

    def _pack_error(self, e: Exception) -> None:
        if self.failed is None and self.pack_failed is None:  # else its files were removed, or it was said
            log.warning(one_line(f"warning: the board's files could not be packed during GPTQ ({e}); hardware packs them after it"))
        self.pack_failed = e

    def _write_lm_head(self, source: str, tensor) -> WrittenAhead:
        """lm_head.py's rtn or trunc of the float output layer `source` (its shard's `tensor`, fp16 as
        the checkpoint holds it), on a thread of its own: the layers' files go on meanwhile."""
        method, grid = self.lm_head
        dims = self.dims
        name = TensorView({}, dims, self.folder).source_name(source)
        weight = tensor.numpy()
        paths = lm_head_files(self.folder / "lm_head", dims.family.software)

        def rows_of(rows: slice):
            if self.stopping.is_set():
                raise Stopped()
            block = weight[rows]
            check_finite(name, block, first_row=rows.start)  # refused there by lm_head.py, which then computes it itself
            return block

        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        err, ref = write_lm_head(rtn_blocks(rows_of, method, grid, dims.hidden, source), dims.vocab, dims.hidden, paths)
        if self.packed is not None:
            try:
                self._pack_later([output_layer_job(self.folder / "lm_head", dims)], self.output_packing)
            except Exception as e:  # noqa: BLE001 - its files are whole: lm_head.py takes them; hardware packs it
                self._pack_error(e)
        return WrittenAhead(paths, method, grid, source, err, ref)

    def written(self) -> Path | None:
        """The folder of compile_sw's qweight.bin files, once it holds every layer's; None where it
        does not (an error, or an engine that hands no layers over). Waits for the packing that
        reads them."""
        wait(self.packing)
        whole = self.failed is None and self.dims is not None and self.layers == set(range(self.dims.num_layers))
        return self.folder / "compile" if whole else None

    def lm_head_written(self) -> WrittenAhead | None:
        """The output layer's files, once written (waits for them, and for the packing that reads
        them); None where they were not."""
        if self.lm_head_job is None:
            return None
        self.lm_head_job.exception()  # its packing is queued once its files are written
        wait(self.output_packing)
        error = self.lm_head_job.exception()
        if error is None:
            return self.lm_head_job.result()
        if not isinstance(error, Stopped):
            log.warning(one_line(f"warning: lm_head's files could not be written during GPTQ ({error}); lm_head writes them after it"))
        return None

    def packed_ahead(self) -> PackedAhead | None:
        """The linears packed in the board's layout (waits for the packing); None where packing failed."""
        if self.lm_head_job is not None:
            self.lm_head_job.exception()
        wait(self.packing + self.output_packing)  # their errors are kept in pack_failed
        return self.packed if self.pack_failed is None and self.failed is None else None

    def remove(self) -> None:
        self.stopping.set()
        if self.lm_head_job is not None:
            self.lm_head_job.exception()  # no thread writes into the folder once it is removed
        if self.packer is not None:
            self.packer.shutdown(wait=True, cancel_futures=True)
        if self.made:
            shutil.rmtree(self.folder, ignore_errors=True)
        remove_created(self.created)


class NoRoom(Exception):
    """The disk cannot hold compile_sw's output: nothing is written ahead."""


class Stopped(Exception):
    """The run ended before the output layer's files were written."""


@contextlib.contextmanager
def compiling_during_gptq(checkpoint: Path, model: Path, lm_head: tuple[str, int] | None = None,
                          board: tuple[int, str] | None = None) -> Iterator[ExportPrewriter]:
    """quantize.py --compile: the consumer for quantize_model's `on_shard` (ExportPrewriter), for
    export_all(ahead=...). Its folder is gone when the block ends, whatever happened in it."""
    prewriter = ExportPrewriter(checkpoint, model, lm_head, board)
    try:
        yield prewriter
    finally:
        prewriter.remove()


def export_all(qdir: Path, lm_head_method: str | None = None, ports: int = BOARD_PORTS, parts: int = BOARD_EMBEDDING_PARTS, progress: bool = True,
               fp16_rescale: str = "auto", ahead: ExportPrewriter | None = None, board: BoardOptions | None = None) -> dict:
    """compile_sw -> lm_head -> hardware -> embedding_tokens; returns the folders. `ahead`: what
    was written during GPTQ (compiling_during_gptq); `board`: hardware.py's options (its ports win
    over `ports`)."""
    qdir = Path(qdir)
    compile_dir = qdir / "compile"
    qweights = ahead.written() if ahead is not None else None
    log.info(compile_software(qdir, compile_dir, progress=progress, fp16_rescale=fp16_rescale, qweights_from=qweights,
                              ports=None if qweights is not None else (board or BoardOptions(ports=ports)).ports).line())
    lm_head = ahead.lm_head_written() if ahead is not None else None
    result, method, error = quantize_lm_head(qdir, compile_dir, lm_head_method, progress=progress, ahead=lm_head)
    if error is not None:
        log.info(f"lm_head ({method}): relative error ||W - W_hat|| / ||W|| = {error:.5f}")
    log.info(result.line())
    hw = pack_hardware(compile_dir, None, ports, progress=progress, opts=board,  # the int4 code: as quantize.py recorded it
                       ahead=ahead.packed_ahead() if ahead is not None else None)
    log.info(format_assumptions(hw.details))
    log.info(hw.line())
    log.info(split_embedding(compile_dir, hw.out / EMBEDDING_DIR, parts, progress=progress).line())
    return {"qdir": qdir, "compile": compile_dir, "hw": hw.out}
