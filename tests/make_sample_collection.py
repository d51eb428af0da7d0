"""Writes the binary files of the shipped sample collection (chains/collections/docs_qa/).

The PDF, DOCX and XLSX files are committed; this script is how they were made, so they can be
re-made after an edit: ``python tests/make_sample_collection.py``. It needs fpdf2 (the ``test``
extra), python-docx and openpyxl. The PDF is English only: fpdf2's built-in fonts have no Hangul,
and the collection's Korean text lives in the DOCX, the XLSX and the text files.
"""

from __future__ import annotations

import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "chains" / "collections" / "docs_qa"

MANUAL_PAGES = [
    (
        "Installation",
        "Before installing the Aurora thermostat, switch off the power to your heating system at "
        "the circuit breaker. Remove the old thermostat, label each wire, and connect the C-wire "
        "(common wire) to the C terminal: the Aurora needs a C-wire for continuous power.",
    ),
    (
        "Wi-Fi setup",
        "The Aurora connects to 2.4 GHz Wi-Fi networks only; 5 GHz networks are not supported. "
        "To reset the network settings, hold the centre button for 5 seconds until the ring "
        "blinks blue, then pair it again in the Lumen Home app.",
    ),
    (
        "Batteries and display",
        "Two AA batteries keep the schedule and clock running during a power cut and last about "
        "12 months. A low-battery icon appears on the display two weeks before they run out. "
        "The display dims after 30 seconds without a touch.",
    ),
]

WARRANTY = [
    (
        "Warranty coverage",
        "Every Aurora thermostat has a two-year limited warranty from the date of purchase. It "
        "covers manufacturing defects in materials and workmanship.",
    ),
    (
        "What the warranty does not cover",
        "The warranty does not cover water damage, damage from misuse or a wrong installation, "
        "or normal wear of the housing.",
    ),
    (
        "How to make a warranty claim",
        "Send the serial number (on the back plate) and your proof of purchase to "
        "warranty@lumen.example. We answer within three business days.",
    ),
]

KO_GUIDE = [
    (
        "설치 안내",
        "온도조절기를 설치하기 전에 반드시 차단기에서 난방기 전원을 내려 주세요. "
        "기존 온도조절기의 배선에 "
        "이름표를 붙인 뒤 분리하고, 공통선(C선)을 C 단자에 연결합니다.",
    ),
    (
        "와이파이 연결",
        "오로라 온도조절기는 2.4GHz 와이파이만 지원하며 5GHz 네트워크에는 "
        "연결되지 않습니다. 연결이 "
        "끊기면 가운데 버튼을 5초 동안 눌러 초기화한 뒤 앱에서 다시 등록하세요.",
    ),
    (
        "개인정보 보호",
        "온도 기록과 사용 패턴은 암호화되어 저장됩니다. 앱에서 데이터 삭제를 요청하면 "
        "30일 이내에 모든 "
        "기록이 영구적으로 삭제됩니다.",
    ),
]

SUPPORT_SHEETS = {
    "Contacts": [
        ("team", "hours", "contact"),
        ("Customer support", "Monday to Friday, 9 am to 6 pm", "phone 1-800-555-0199"),
        ("Installer network", "Every day, 8 am to 8 pm", "book a certified installer in the app"),
    ],
    "고객센터": [
        ("질문", "답변"),
        (
            "고객센터 상담 시간은 언제인가요?",
            "고객센터 전화 상담은 평일 오전 9시부터 오후 6시까지 운영하며, 점심시간(12시~1시)에는 "
            "상담이 어렵습니다.",
        ),
        (
            "카카오톡으로도 상담할 수 있나요?",
            "네, 카카오톡 채널 '루멘 홈'을 추가하면 24시간 챗봇 상담을 받을 수 있고 상담원 연결은 "
            "운영 시간에 가능합니다.",
        ),
        (
            "해외로도 배송이 되나요?",
            "해외 배송은 40개국으로 가능하며, 배송에는 7일에서 14일이 걸리고 "
            "관세는 수령인이 부담합니다.",
        ),
    ],
}


def write_pdf(path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title("Aurora thermostat manual")
    for heading, body in MANUAL_PAGES:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 16)
        pdf.multi_cell(0, 10, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=12)
        pdf.multi_cell(0, 7, body, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))


def write_docx(path: Path, sections: list[tuple[str, str]], title: str) -> None:
    import docx

    document = docx.Document()
    document.add_heading(title, level=0)
    for heading, body in sections:
        document.add_heading(heading, level=1)
        document.add_paragraph(body)
    document.core_properties.title = title
    document.save(str(path))


def write_xlsx(path: Path) -> None:
    from openpyxl import Workbook

    workbook = Workbook()
    workbook.remove(workbook.active)
    for name, rows in SUPPORT_SHEETS.items():
        sheet = workbook.create_sheet(name)
        for row in rows:
            sheet.append(list(row))
    workbook.save(str(path))


def main(folder: Path = FOLDER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_pdf(folder / "thermostat-manual.pdf")
    write_docx(folder / "warranty.docx", WARRANTY, "Aurora warranty")
    write_docx(folder / "ko-guide.docx", KO_GUIDE, "오로라 사용 안내")
    write_xlsx(folder / "support.xlsx")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER)
