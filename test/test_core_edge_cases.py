"""Edge cases of the core library that fit no other test file: malformed data set CSVs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_vpr.core.datasets import read_poses_csv
from vlm_vpr.core.errors import DatasetError


@pytest.mark.parametrize(
    ('header', 'rows', 'line', 'missing'),
    [
        ('image,x,y', 'a.png,1,2\nb.png,1\n', 3, 'y'),
        ('image,x,y', 'a.png\n', 2, 'x, y'),
        ('image,x,y,yaw', 'a.png,1,2,0.5\nb.png,3\n', 3, 'y'),
    ],
)
def test_a_short_csv_row_names_the_file_line_and_missing_fields(
    tmp_path: Path, header: str, rows: str, line: int, missing: str
) -> None:
    (tmp_path / 'images').mkdir()
    for name in ('a.png', 'b.png'):
        (tmp_path / 'images' / name).write_bytes(b'')
    csv_path = tmp_path / 'poses.csv'
    csv_path.write_text(f'{header}\n{rows}')
    with pytest.raises(DatasetError, match=f'line {line}: missing field\\(s\\) {missing} ') as err:
        read_poses_csv(csv_path, tmp_path / 'images')
    assert str(csv_path) in str(err.value)


def test_empty_x_and_y_still_mean_out_of_map(tmp_path: Path) -> None:
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'a.png').write_bytes(b'')
    (tmp_path / 'poses.csv').write_text('image,x,y\na.png,,\n')
    traversal = read_poses_csv(tmp_path / 'poses.csv', tmp_path / 'images')
    assert len(traversal) == 1 and traversal.xy.shape == (1, 2)
    assert all(v != v for v in traversal.xy[0])  # NaN
