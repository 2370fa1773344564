"""The hand-built heads: weights streamed to external files, graphs that compute the right logits."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from slc.export.onnx_graphs import (
    ALIGN,
    HEADS,
    SyntheticRows,
    WeightsFile,
    build_head_graph,
    class_row,
    externalize,
    save_checked,
    write_single_logit,
)

K, D = 7, 5


@pytest.fixture
def head():
    rng = np.random.default_rng(0)
    return rng.standard_normal((K, D), dtype=np.float32), rng.standard_normal(K, dtype=np.float32)


@pytest.fixture
def features():
    return np.random.default_rng(1).standard_normal((6, D), dtype=np.float32)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tensors_written_in_chunks_read_back_exactly_at_aligned_offsets(tmp_path, head):
    weight, bias = head
    with WeightsFile(tmp_path / "w.bin") as file:
        w = file.add("w", weight, chunk_rows=2)
        b = file.add("b", bias)
    for tensor, array in ((w, weight), (b, bias)):
        entries = {e.key: e.value for e in tensor.external_data}
        assert entries["location"] == "w.bin" and int(entries["offset"]) % ALIGN == 0
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(tmp_path))
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), array)



def test_externalize_moves_big_initializers_to_aligned_offsets_and_keeps_small_ones_inline(tmp_path):
    rng = np.random.default_rng(2)
    big = {name: rng.random(n, dtype=np.float32) for name, n in (("a", 300), ("b", 1000), ("c", 5000))}
    small = np.array([1, 2], np.int64)  # e.g. a Reshape's shape, which shape inference must read inline
    nodes = [onnx.helper.make_node("Cast", ["small"], ["small_f"], to=onnx.TensorProto.FLOAT),
             onnx.helper.make_node("ReduceSum", ["a"], ["sa"], keepdims=0),
             onnx.helper.make_node("ReduceSum", ["b"], ["sb"], keepdims=0),
             onnx.helper.make_node("ReduceSum", ["c"], ["sc"], keepdims=0),
             onnx.helper.make_node("ReduceSum", ["small_f"], ["ss"], keepdims=0),
             onnx.helper.make_node("Sum", ["sa", "sb", "sc", "ss"], ["total"])]
    graph = onnx.helper.make_graph(
        nodes, "g", [], [onnx.helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, [])],
        [numpy_helper.from_array(array, name) for name, array in {**big, "small": small}.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    with WeightsFile(tmp_path / "backbone.weights") as weights:
        externalize(model, weights)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}
    assert sorted(name for name, entries in where.items() if entries) == ["a", "b", "c"]  # 1200 bytes and up
    assert all(int(where[name]["offset"]) % ALIGN == 0 for name in big)
    (total,) = session(save_checked(model, tmp_path / "m.onnx")).run(None, {})
    assert total == pytest.approx(sum(float(a.sum()) for a in big.values()) + 3, rel=1e-5)

def test_synthetic_rows_are_the_same_however_they_are_sliced():
    rows = SyntheticRows(k=2500, d=3, seed=4, block=1000)
    whole = rows[0:2500]
    assert whole.shape == (2500, 3) and whole.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([rows[0:999], rows[999:1001], rows[1001:2500]]), whole)
    np.testing.assert_array_equal(rows.rows([2499, 0, 1000]), whole[[2499, 0, 1000]])
    assert not np.array_equal(SyntheticRows(2500, 3, seed=5)[0:10], whole[:10])


def test_single_logit_gives_each_row_the_logit_of_its_own_class(tmp_path, head, features):
    weight, bias = head
    paths = write_single_logit(tmp_path, weight, bias)
    assert sorted(p.name for p in paths.values()) == ["head_model.onnx", "head_single_logit.onnx"]
    class_id = np.array([0, 6, 3, 3, 1, 6], np.int64)
    (logit,) = session(paths["single_logit"]).run(None, {"features": features, "class_id": class_id})
    expected = np.einsum("nd,nd->n", features, weight[class_id]) + bias[class_id]
    np.testing.assert_allclose(logit, expected, rtol=1e-6, atol=1e-6)


def test_single_logit_touches_the_head_only_through_a_gather_of_one_row_per_class_id(tmp_path, head):
    """O(d) per example at any k: no node multiplies the whole (k, d) head, only rows picked by class_id."""
    weight, bias = head
    model = onnx.load(str(write_single_logit(tmp_path, weight, bias, kinds=("single_logit",))["single_logit"]),
                      load_external_data=False)
    readers = [node for node in model.graph.node if {"slc_head_weight", "slc_head_bias"} & set(node.input)]
    assert [(node.op_type, list(node.input)) for node in readers] == [
        ("Gather", ["slc_head_weight", "class_id"]), ("Gather", ["slc_head_bias", "class_id"])]
    assert all(attribute.i == 0 for node in readers for attribute in node.attribute if attribute.name == "axis")


def test_full_head_gives_all_k_logits(tmp_path, head, features):
    weight, bias = head
    paths = write_single_logit(tmp_path, weight, bias, kinds=("full",))
    (logits,) = session(paths["full"]).run(None, {"features": features})
    np.testing.assert_allclose(logits, features @ weight.T + bias, rtol=1e-6, atol=1e-6)


def test_a_class_head_holds_only_its_own_row_inline(tmp_path, head, features):
    weight, bias = head
    w, b = class_row(weight, bias, 4)
    model = build_head_graph("class", w, b, feature_dim=D)
    path = save_checked(model, tmp_path / "class_4.onnx")
    assert sum(numpy_helper.to_array(t).size for t in model.graph.initializer) == D + 1
    (logit,) = session(path).run(None, {"features": features})
    np.testing.assert_allclose(logit, features @ weight[4] + bias[4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_has_a_dynamic_batch(tmp_path, head, kind):
    weight, bias = head
    w, b = class_row(weight, bias, 0) if kind == "class" else (numpy_helper.from_array(weight, "w"),
                                                               numpy_helper.from_array(bias, "b"))
    model = build_head_graph(kind, w, b, feature_dim=D)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_negative_class_ids_wrap_around_silently_so_serving_must_check_the_range(tmp_path, head, features):
    """ONNX Gather accepts -k..k-1: -1 answers for class k-1 without an error."""
    weight, bias = head
    path = write_single_logit(tmp_path, weight, bias, kinds=("single_logit",))["single_logit"]
    run = session(path).run
    np.testing.assert_array_equal(run(None, {"features": features[:1], "class_id": np.array([-1])})[0],
                                  run(None, {"features": features[:1], "class_id": np.array([K - 1])})[0])


def test_unknown_head_kind_lists_the_known_ones(head):
    w, b = (numpy_helper.from_array(a) for a in head)
    with pytest.raises(KeyError, match="full, single_logit, class"):
        build_head_graph("all_but_one", w, b, feature_dim=D)


def test_bias_of_the_wrong_length_is_refused(tmp_path, head):
    with pytest.raises(ValueError, match=r"expected \(7,\)"):
        write_single_logit(tmp_path, head[0], head[1][:3])

