"""Questions about the shipped sample collection (chains/collections/docs_qa/), each with the id
of the passage that answers it. Worded as a customer would ask, not copied from the passage."""

from __future__ import annotations

QUESTIONS: list[tuple[str, str, str]] = [
    # (language, question, the passage that answers it)
    ("en", "How many days until my refund arrives?", "refund-policy.md#2"),
    ("en", "My parcel came broken, what should I do?", "refund-policy.md#4"),
    ("en", "Can I swap my thermostat for a different colour?", "refund-policy.md#3"),
    ("en", "Is shipping free?", "shipping.txt#1"),
    ("en", "Who pays customs duties on international orders?", "shipping.txt#1"),
    ("en", "Do I need a C-wire to install the thermostat?", "thermostat-manual.pdf#p1-1"),
    ("en", "Does it support 5 GHz Wi-Fi?", "thermostat-manual.pdf#p2-1"),
    ("en", "How long do the batteries last?", "thermostat-manual.pdf#p3-1"),
    ("en", "How long is the warranty?", "warranty.docx#1"),
    ("en", "Is water damage covered by the warranty?", "warranty.docx#2"),
    ("en", "Is there a discount for students?", "faq.csv#row3"),
    ("en", "I forgot my password", "faq.csv#row4"),
    ("en", "Can I cancel an order I just placed?", "faq.csv#row2"),
    ("en", "When can I call customer support?", "support.xlsx#Contacts!row2"),
    ("ko", "주문 취소는 어떻게 하나요?", "ko-faq.csv#row2"),
    ("ko", "교환은 며칠 안에 신청해야 하나요?", "ko-faq.csv#row3"),
    ("ko", "현금영수증 발급 방법을 알려주세요", "ko-faq.csv#row4"),
    ("ko", "골드 회원이 되려면 얼마나 구매해야 하나요?", "ko-membership.md#2"),
    ("ko", "포인트 유효기간이 얼마인가요?", "ko-membership.md#3"),
    ("ko", "주말에도 매장을 여나요?", "ko-store.txt#1"),
    ("ko", "매장 주차는 무료인가요?", "ko-store.txt#1"),
    ("ko", "설치하기 전에 전원을 꺼야 하나요?", "ko-guide.docx#1"),
    ("ko", "5GHz 와이파이에 연결할 수 있나요?", "ko-guide.docx#2"),
    ("ko", "내 데이터를 삭제하려면 어떻게 하나요?", "ko-guide.docx#3"),
    ("ko", "상담원과 전화 통화는 몇 시까지 가능한가요?", "support.xlsx#고객센터!row2"),
    ("ko", "카카오톡 상담이 되나요?", "support.xlsx#고객센터!row3"),
    ("ko", "생일 쿠폰은 얼마짜리인가요?", "ko-membership.md#2"),
    ("ko", "해외 배송 시 관세는 누가 내나요?", "support.xlsx#고객센터!row4"),
]
